// Package frontend is the local frontend: it plays a guest's blkfront
// inside the daemon where there is no Xen, and offers that guest's view of
// the disk as an io.ReaderAt / io.WriterAt (what the NBD export serves).
//
// The caller's duties, in order:
//
//  1. New: allocates the shared memory (a local.GrantTable), the ring
//     (initialised and granted) and the event channel.
//  2. Hand RingRefs, Protocol and BackendFDs to the worker (the daemon dups
//     the fds and sends them over SCM_RIGHTS); the worker calls
//     local.Attach and ring.Serve. The xenstore handshake is the
//     reconciler's business.
//  3. SetFeatures with what the backend published (optional), then
//     Connect once the backend is Connected, with the size it published.
//  4. ReadAt / WriteAt / Flush from any number of goroutines.
//  5. Close (or CloseWithError when the worker died): in-flight and later
//     calls fail with that error.
//
// Each call is split into requests of up to 11 pages (44 KiB), or, when
// both sides do indirect requests (Options.MaxIndirectSegments and
// SetFeatures), of up to that many pages. Every request takes a tag: a
// ring slot's worth of data pages, granted to the backend only while the
// request is in flight (read-only for writes).
//
// One reaper goroutine per frontend (from Connect to Close) sleeps on the
// notify eventfd in the runtime's netpoller and collects every response:
// it hands a blocking call its status over a channel, and runs the
// Completer of a request started with StartRead / StartWrite itself, so a
// server that starts requests from its reader and answers them from the
// reaper has no goroutine hand-off per request. Started requests are held
// back (not published to the backend) until Publish, or until a Start has
// to wait for a free tag, or a blocking call publishes, so a batch of
// them costs the backend one wake-up. A caller with nothing else to do may
// Poll for responses itself for a few microseconds, sparing the reaper's
// wake-up at queue depth 1.
//
// A call returns only after the backend's responses; a backend error
// status becomes an error wrapping syscall.EIO (EOPNOTSUPP for unsupported
// ops). A backend that breaks the ring (a response to a request never
// made, rsp_prod past the requests) fails the frontend with ring.ErrHostile.
//
// Unaligned offsets and lengths work: reads fetch the enclosing 512-byte
// sectors and copy the part asked for; writes do read-modify-write of the
// partial head and tail sectors, serialised among themselves so disjoint
// unaligned writes into one sector do not lose each other's bytes.
package frontend

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"slices"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/local"
	"github.com/blktap-go/blktap/tapengine/ring"
)

// Error classes.
var (
	// ErrClosed: the frontend was closed; the call did not complete.
	ErrClosed = errors.New("frontend: closed")
	// ErrNotConnected: a call before Connect.
	ErrNotConnected = errors.New("frontend: not connected")
	// ErrIO: the backend answered BLKIF_RSP_ERROR.
	ErrIO = fmt.Errorf("frontend: backend reported an I/O error: %w", syscall.EIO)
	// ErrNotSupported: the backend answered BLKIF_RSP_EOPNOTSUPP.
	ErrNotSupported = fmt.Errorf("frontend: backend does not support the operation: %w", syscall.EOPNOTSUPP)
	// ErrReadOnly: a write to a disk the backend connected read-only.
	ErrReadOnly = fmt.Errorf("frontend: disk is read-only: %w", syscall.EROFS)
)

// Options configures New.
type Options struct {
	// Protocol is the layout the frontend writes (what it would put in
	// the "protocol" key).
	Protocol blkif.Protocol
	// RingOrder: the ring has 2^RingOrder pages (0..4), 32<<order slots.
	RingOrder int
	// Logger; nil means slog.Default().
	Logger *slog.Logger
	// MaxIndirectSegments > 11 prepares indirect requests of up to this
	// many pages (BLKIF_OP_INDIRECT); they are used only once SetFeatures
	// says the backend takes them. The pages a frontend shares are capped
	// at PageBudget, so a big ring gets fewer segments per request.
	MaxIndirectSegments int
}

// PageBudget caps the data pages (4 KiB each) one frontend shares with its
// backend when it prepares indirect requests: 16 MiB.
const PageBudget = 4096

// Features are what the backend published in xenstore, as the reconciler
// read them.
type Features struct {
	Discard             bool // feature-discard
	MaxIndirectSegments int  // feature-max-indirect-segments (0: absent)
}

const (
	sector   = blkif.SectorSize
	pageSize = blkif.PageSize
)

// tag is one request's worth of resources. A tag belongs to the caller
// that took it from free until it gives it back.
type tag struct {
	first uint32 // first of Frontend.segs consecutive data pages
	mem   []byte // the frontend's view of those pages
	ind   uint32 // first of the indirect pages (if any)
	done  chan int16
	// Set by a Start call before the push, read by the reaper after the
	// response (the ring's barriers order the two):
	cb     Completer // nil for a blocking call
	cookie uint64
	op     uint8 // of a started request
	n      int   // bytes of a started read
	lent   bool  // owned by a TakeTag caller: the reaper does not free it
	// Guarded by Frontend.mu:
	busy    bool // pushed, response not yet consumed
	nPages  int  // data pages granted for the request in flight
	nIndPgs int  // indirect pages granted for it
}

// Completer receives the results of StartRead and StartWrite. Its methods
// run on the goroutine that collects the responses: the frontend's reaper
// or a caller of Poll, so possibly on two goroutines at once for
// different requests. They must not block for long, nor call back into
// the frontend's blocking calls. (An interface literal under an alias, so
// an identical one elsewhere, e.g. nbd.Completer, is the same type.)
type Completer = interface {
	// Complete reports one started request. For a read, data holds the
	// bytes read; it is valid only until Complete returns.
	Complete(cookie uint64, data []byte, err error)
	// CompleteBatch follows the Complete calls of one batch of responses
	// (called once per Completer that got any).
	CompleteBatch()
}

// Frontend is one local guest frontend. Safe for concurrent use.
type Frontend struct {
	opts  Options
	log   *slog.Logger
	gt    *local.GrantTable
	ch    *local.Channel
	rings uint32 // first ring ref
	tags  []tag
	free  chan uint16
	segs  int // data pages per tag: 11, or more for indirect requests

	// Set before Connect, read-only afterwards.
	features Features
	chunk    int // bytes per request: 11 pages, or the indirect size

	notifyFile *os.File      // a dup of the notify eventfd, read through the netpoller
	reaperDone chan struct{} // closed when the reaper returns
	rmw        sync.Mutex    // serialises read-modify-write of partial sectors

	// life is read-held by every call while it touches shared memory,
	// so Close can unmap it only when no call is left inside.
	life sync.RWMutex

	mu         sync.Mutex
	front      *ring.Front
	connected  bool
	closed     bool
	released   bool // Close ran: memory and descriptors go or went
	closeErr   error
	closedCh   chan struct{}
	held       bool // requests pushed but not yet published (see Publish)
	lent       int  // tags out with TakeTag callers
	unmapLater bool // Close left the unmapping to the last PutTag
	size       int64
	secSize    uint32
	readOnly   bool
}

// New allocates the shared memory, initialises and grants the ring, and
// creates the event channel.
func New(opts Options) (*Frontend, error) {
	if !opts.Protocol.Valid() {
		return nil, fmt.Errorf("frontend: protocol %v", opts.Protocol)
	}
	entries := blkif.Entries(opts.Protocol, opts.RingOrder)
	if entries == 0 {
		return nil, fmt.Errorf("frontend: ring order %d not in [0, %d]", opts.RingOrder, blkif.MaxRingOrder)
	}
	f := &Frontend{opts: opts, log: opts.Logger, closedCh: make(chan struct{})}
	if f.log == nil {
		f.log = slog.Default()
	}
	ringPages := 1 << opts.RingOrder
	f.segs = blkif.SegmentsMax
	indPages := 0
	if opts.MaxIndirectSegments > blkif.SegmentsMax {
		f.segs = min(opts.MaxIndirectSegments, blkif.IndirectPagesMax*blkif.SegmentsPerIndirect, PageBudget/entries)
		f.segs = max(f.segs, blkif.SegmentsMax)
		if f.segs > blkif.SegmentsMax {
			indPages = (f.segs + blkif.SegmentsPerIndirect - 1) / blkif.SegmentsPerIndirect
		}
	}
	f.chunk = blkif.SegmentsMax * pageSize
	gt, err := local.NewGrantTable(ringPages + entries*(f.segs+indPages))
	if err != nil {
		return nil, err
	}
	f.gt = gt
	fail := func(err error) (*Frontend, error) {
		if f.ch != nil {
			f.ch.Close()
		}
		gt.Close()
		return nil, err
	}
	if f.rings, err = gt.Alloc(ringPages); err != nil {
		return fail(err)
	}
	if f.front, err = ring.NewFront(gt.Memory(f.rings, ringPages), opts.Protocol); err != nil {
		return fail(err)
	}
	f.front.Init()
	for i := range ringPages {
		if err := gt.Grant(f.rings+uint32(i), false); err != nil {
			return fail(err)
		}
	}
	f.tags = make([]tag, entries)
	f.free = make(chan uint16, entries)
	for i := range f.tags {
		first, err := gt.Alloc(f.segs)
		if err != nil {
			return fail(err)
		}
		f.tags[i] = tag{first: first, mem: gt.Memory(first, f.segs), done: make(chan int16, 1)}
		if indPages > 0 {
			if f.tags[i].ind, err = gt.Alloc(indPages); err != nil {
				return fail(err)
			}
		}
		f.free <- uint16(i)
	}
	if f.ch, err = local.NewChannel(); err != nil {
		return fail(err)
	}
	return f, nil
}

// RingRefs are the grant refs of the ring pages, in order.
func (f *Frontend) RingRefs() []uint32 {
	refs := make([]uint32, 1<<f.opts.RingOrder)
	for i := range refs {
		refs[i] = f.rings + uint32(i)
	}
	return refs
}

// RingOrder is the ring's page order.
func (f *Frontend) RingOrder() int { return f.opts.RingOrder }

// Protocol is the ring layout.
func (f *Frontend) Protocol() blkif.Protocol { return f.opts.Protocol }

// BackendFDs are what the worker needs (the frontend keeps ownership: dup
// them to send).
func (f *Frontend) BackendFDs() (memfd, kickfd, notifyfd int) {
	k, n := f.ch.BackendFDs()
	return f.gt.FD(), k, n
}

// SetFeatures records what the backend offers; call it before Connect.
// With indirect segments on both sides, requests grow to
// min(Options.MaxIndirectSegments, feature, budget) pages.
func (f *Frontend) SetFeatures(ft Features) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.connected || f.closed {
		return errors.New("frontend: SetFeatures after Connect")
	}
	if ft.MaxIndirectSegments < 0 {
		return fmt.Errorf("frontend: feature-max-indirect-segments %d", ft.MaxIndirectSegments)
	}
	f.features = ft
	f.chunk = blkif.SegmentsMax * pageSize
	if n := min(ft.MaxIndirectSegments, f.segs); n > blkif.SegmentsMax {
		f.chunk = n * pageSize
	}
	return nil
}

// Connect starts the frontend once the backend is Connected, with the disk
// size it published (sectors in 512-byte units, as in xenstore).
func (f *Frontend) Connect(sectors uint64, sectorSize uint32, readOnly bool) error {
	if sectors > uint64(1<<63-1)/sector {
		return fmt.Errorf("frontend: %d sectors is too large", sectors)
	}
	if sectorSize < sector || sectorSize%sector != 0 {
		return fmt.Errorf("frontend: sector-size %d", sectorSize)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return f.closeErr
	}
	if f.connected {
		return errors.New("frontend: already connected")
	}
	fd, err := unix.Dup(f.ch.WaitFD())
	if err != nil {
		return fmt.Errorf("frontend: dup notify fd: %w", err)
	}
	unix.CloseOnExec(fd)
	// Non-blocking (eventfds are), so a sleeping reaper parks in the
	// runtime's netpoller and holds no OS thread or P.
	f.notifyFile = os.NewFile(uintptr(fd), "blkif-notify")
	f.size, f.secSize, f.readOnly = int64(sectors)*sector, sectorSize, readOnly
	f.connected = true
	f.reaperDone = make(chan struct{})
	go f.reaper()
	return nil
}

// Size is the disk size in bytes (0 before Connect).
func (f *Frontend) Size() int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.size
}

// Done is closed once the frontend stops, whether its owner closed it or
// it gave up on a backend that broke the ring: the owner learns of the
// latter only here, as nothing else calls it back.
func (f *Frontend) Done() <-chan struct{} { return f.closedCh }

// Err is why the frontend stopped (wrapping ErrClosed, and ring.ErrHostile
// when the backend broke the ring), or nil while it runs.
func (f *Frontend) Err() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.closed {
		return nil
	}
	return f.closeErr
}

// Close fails every call in flight and every later call with ErrClosed,
// and releases the shared memory.
func (f *Frontend) Close() error { return f.CloseWithError(nil) }

// CloseWithError is Close with a cause (e.g. the worker died): calls fail
// with an error wrapping both ErrClosed and cause.
func (f *Frontend) CloseWithError(cause error) error {
	f.mu.Lock()
	if f.released {
		f.mu.Unlock()
		return nil
	}
	// A frontend that gave up on its own is closed to calls already, but
	// its memory and descriptors are still to release.
	f.released = true
	f.failLocked(cause)
	f.mu.Unlock()
	// Wake the reaper; it sees the close, fails the started requests
	// still in flight and returns.
	_ = f.ch.Wake()
	if f.reaperDone != nil {
		<-f.reaperDone
	}
	// Wait for every call to leave the shared memory before unmapping it.
	f.life.Lock()
	defer f.life.Unlock()
	var ferr error
	if f.notifyFile != nil {
		ferr = f.notifyFile.Close()
	}
	err := errors.Join(ferr, f.ch.Close())
	// Pages lent out (TakeTag) may still be read by their holder: the
	// last PutTag unmaps then.
	f.mu.Lock()
	unmap := f.lent == 0
	f.unmapLater = !unmap
	f.mu.Unlock()
	if unmap {
		err = errors.Join(err, f.gt.Close())
	}
	return err
}

// failLocked marks the frontend closed and fails every request in flight.
func (f *Frontend) failLocked(cause error) {
	if f.closed {
		return
	}
	f.closed = true
	f.closeErr = ErrClosed
	if cause != nil {
		f.closeErr = fmt.Errorf("%w: %w", ErrClosed, cause)
	}
	close(f.closedCh)
}

// reaper collects every response until the frontend closes: a blocking
// call gets its status on its tag's channel, a started request its
// Completer call. It sleeps reading the notify eventfd (which also
// consumes the signal); a signal sent after the final check in
// collectLocked wakes it.
func (f *Frontend) reaper() {
	defer close(f.reaperDone)
	var r reaping
	var buf [8]byte
	for {
		if f.reapOnce(&r) {
			f.failStarted()
			return
		}
		if _, err := f.notifyFile.Read(buf[:]); err != nil {
			f.fail(fmt.Errorf("reading notify eventfd: %w", err))
		}
	}
}

// reaping is the scratch of one goroutine collecting responses.
type reaping struct {
	batch []reaped
	sinks []Completer
}

// reapings recycles Poll's scratch, so polling allocates nothing.
var reapings = sync.Pool{New: func() any { return new(reaping) }}

type reaped struct {
	id uint16
	st int16
}

// reapOnce collects every published response and completes it: a blocking
// call gets its status on its tag's channel, a started request its
// Completer call. It reports whether the frontend is closed (or just
// failed), so the caller stops.
func (f *Frontend) reapOnce(r *reaping) (stop bool) {
	r.batch = r.batch[:0]
	f.mu.Lock()
	closed := f.closed
	var err error
	if !closed {
		err = f.collectLocked(func(id uint16, st int16) { r.batch = append(r.batch, reaped{id, st}) })
	}
	f.mu.Unlock()
	if err != nil {
		f.log.Error("frontend: backend broke the ring; failing the disk", "err", err)
		f.fail(err)
	}
	r.sinks = r.sinks[:0]
	for _, d := range r.batch {
		t := &f.tags[d.id]
		if t.cb == nil {
			// Each done channel has room for its one response.
			t.done <- d.st
			continue
		}
		cb, cookie := t.cb, t.cookie
		var data []byte
		err := statusErr(d.st, t.op)
		if err == nil && t.op == blkif.OpRead {
			data = t.mem[:t.n]
		}
		lent := t.lent
		t.cb = nil
		cb.Complete(cookie, data, err)
		if !lent {
			f.release(d.id)
		}
		if !slices.Contains(r.sinks, cb) {
			r.sinks = append(r.sinks, cb)
		}
	}
	for _, cb := range r.sinks {
		cb.CompleteBatch()
	}
	return closed || err != nil
}

// Poll waits up to spin, busy, for responses and completes them on the
// calling goroutine (as the reaper would), reporting whether it found any.
// A caller with one request in flight and nothing else to do (queue depth
// 1) saves the reaper's wake-up from its latency: the backend answers a
// cached read in a few microseconds, less than a sleep and a wake cost.
func (f *Frontend) Poll(spin time.Duration) bool {
	if _, _, err := f.enter(); err != nil {
		return false
	}
	defer f.leave()
	deadline := time.Now().Add(spin)
	for {
		f.mu.Lock()
		n, err := f.front.Pending()
		f.mu.Unlock()
		if err != nil || n > 0 {
			r := reapings.Get().(*reaping)
			f.reapOnce(r)
			clear(r.sinks)
			reapings.Put(r)
			return err == nil
		}
		if time.Now().After(deadline) {
			return false
		}
		runtime.Gosched()
	}
}

// failStarted completes every started request still in flight with the
// close error; the frontend is closed, so none of them is answered later
// and their tags are never reused.
func (f *Frontend) failStarted() {
	f.mu.Lock()
	var sinks []Completer
	type started struct {
		cb     Completer
		cookie uint64
	}
	var fail []started
	for i := range f.tags {
		t := &f.tags[i]
		if t.busy && t.cb != nil {
			fail = append(fail, started{t.cb, t.cookie})
			t.cb = nil
			t.busy = false
		}
	}
	err := f.closeErr
	f.mu.Unlock()
	for _, s := range fail {
		s.cb.Complete(s.cookie, nil, err)
		if !slices.Contains(sinks, s.cb) {
			sinks = append(sinks, s.cb)
		}
	}
	for _, cb := range sinks {
		cb.CompleteBatch()
	}
}

// statusErr turns a response status into the error a call returns.
func statusErr(st int16, op uint8) error {
	switch st {
	case blkif.StatusOK:
		return nil
	case blkif.StatusEOPNOTSUPP:
		return fmt.Errorf("%s: %w", blkif.OpName(op), ErrNotSupported)
	default:
		return fmt.Errorf("%s: %w (status %d)", blkif.OpName(op), ErrIO, st)
	}
}

func (f *Frontend) fail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failLocked(err)
}

// collectLocked consumes every published response, with the final check.
func (f *Frontend) collectLocked(complete func(uint16, int16)) error {
	var rsp blkif.Response
	for {
		n, err := f.front.Pending()
		if err != nil {
			return err
		}
		for range n {
			f.front.Next(&rsp)
			if rsp.ID >= uint64(len(f.tags)) || !f.tags[rsp.ID].busy {
				return fmt.Errorf("%w: response for id %d, which is not in flight", ring.ErrHostile, rsp.ID)
			}
			t := &f.tags[rsp.ID]
			t.busy = false
			for i := range t.nPages {
				_ = f.gt.Revoke(t.first + uint32(i))
			}
			for i := range t.nIndPgs {
				_ = f.gt.Revoke(t.ind + uint32(i))
			}
			complete(uint16(rsp.ID), rsp.Status)
		}
		more, err := f.front.FinalCheck()
		if err != nil || !more {
			return err
		}
	}
}

// acquire takes a free tag, or fails when the frontend closes.
func (f *Frontend) acquire() (uint16, error) {
	select {
	case id := <-f.free:
		return id, nil
	default:
	}
	select {
	case id := <-f.free:
		return id, nil
	case <-f.closedCh:
		return 0, f.closeErr
	}
}

func (f *Frontend) release(id uint16) { f.free <- id }

// submit pushes one request on tag id: op over [off, off+n) of the disk,
// with the data in the tag's pages. n is a multiple of 512, at most
// f.chunk (0 for a flush). More than 11 pages go as an indirect request,
// whose segment list the tag's indirect pages carry. Unless hold, it
// publishes every request pushed so far (and kicks when the backend asks).
func (f *Frontend) submit(id uint16, op uint8, off int64, n int, hold bool) error {
	t := &f.tags[id]
	req := blkif.Request{Op: op, ID: uint64(id), Sector: uint64(off) / sector}
	pages := (n + pageSize - 1) / pageSize
	indPages := 0
	if op == blkif.OpDiscard {
		req.NrSectors = uint64(n) / sector
		pages = 0
	} else if pages > blkif.SegmentsMax {
		indPages = (pages + blkif.SegmentsPerIndirect - 1) / blkif.SegmentsPerIndirect
		req = blkif.Request{Op: blkif.OpIndirect, IndirectOp: op, IndirectSegments: uint16(pages), ID: req.ID, Sector: req.Sector}
		list := f.gt.Memory(t.ind, indPages)
		for i := range pages {
			sectors := min(n-i*pageSize, pageSize) / sector
			blkif.EncodeSegment(list[i*blkif.SegmentSize:], &blkif.Segment{Gref: t.first + uint32(i), LastSect: uint8(sectors - 1)})
		}
		for i := range indPages {
			req.IndirectGrefs[i] = t.ind + uint32(i)
		}
	} else {
		for i := range pages {
			sectors := min(n-i*pageSize, pageSize) / sector
			req.Seg[i] = blkif.Segment{Gref: t.first + uint32(i), FirstSect: 0, LastSect: uint8(sectors - 1)}
		}
		req.NrSegments = uint8(pages)
	}
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return f.closeErr
	}
	for i := range pages {
		// A write only lets the backend read the page.
		if err := f.gt.Grant(t.first+uint32(i), op != blkif.OpRead); err != nil {
			f.mu.Unlock()
			return err
		}
	}
	for i := range indPages {
		if err := f.gt.Grant(t.ind+uint32(i), true); err != nil {
			f.mu.Unlock()
			return err
		}
	}
	t.nPages, t.nIndPgs = pages, indPages
	if err := f.front.Push(&req); err != nil {
		f.mu.Unlock()
		// One tag per slot: the ring cannot be full while we hold a tag.
		return fmt.Errorf("frontend: %w", err)
	}
	t.busy = true
	if hold {
		f.held = true
		f.mu.Unlock()
		return nil
	}
	return f.publishLocked()
}

// publishLocked publishes the pushed requests and kicks the backend if it
// asked; it releases f.mu.
func (f *Frontend) publishLocked() error {
	f.held = false
	kick := f.front.PushRequests()
	f.mu.Unlock()
	if kick {
		return f.ch.Kick()
	}
	return nil
}

// Publish lets the backend see the requests started so far. A caller of
// StartRead / StartWrite calls it before it goes to sleep (e.g. waiting for
// its client), so nothing it started is left held back.
func (f *Frontend) Publish() error {
	f.mu.Lock()
	if !f.held || f.closed {
		f.mu.Unlock()
		return nil
	}
	return f.publishLocked()
}

// wait waits for tag id's response and turns its status into an error.
// On error the tag is not given back if the request may still be in
// flight (the frontend is closing and will never reuse it).
func (f *Frontend) wait(id uint16, op uint8) error {
	var st int16
	select {
	case st = <-f.tags[id].done:
	case <-f.closedCh:
		// The response may have raced the close; prefer it.
		select {
		case st := <-f.tags[id].done:
			if st == blkif.StatusOK {
				return nil
			}
		default:
		}
		return f.closeErr
	}
	return statusErr(st, op)
}

// enter admits a call: connected, not closed; it holds life.RLock until
// leave.
func (f *Frontend) enter() (size int64, ro bool, err error) {
	f.life.RLock()
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case f.closed:
		err = f.closeErr
	case !f.connected:
		err = ErrNotConnected
	}
	if err != nil {
		f.life.RUnlock()
	}
	return f.size, f.readOnly, err
}

func (f *Frontend) leave() { f.life.RUnlock() }

// inflight is one chunk of a call: a tag and where its bytes go.
type inflight struct {
	id      uint16
	off     int64 // disk offset of the chunk
	n       int   // chunk length (sector multiple)
	pOff    int   // where in p the wanted bytes start
	skip, k int   // bytes to skip in the chunk, bytes to copy
}

// rw runs op over the sector-aligned range [alo, ahi) in chunks, keeping
// as many in flight as tags allow. For reads, done copies each finished
// chunk out; for writes, fill fills each chunk before it is pushed.
func (f *Frontend) rw(op uint8, alo, ahi int64, fill func(c *inflight, mem []byte), done func(c *inflight, mem []byte), sub func(int64, int) inflight) error {
	var queue []inflight
	var firstErr error
	finish := func() {
		c := queue[0]
		queue = queue[1:]
		err := f.wait(c.id, op)
		if err == nil && done != nil {
			done(&c, f.tags[c.id].mem)
		}
		if err == nil || !errors.Is(err, ErrClosed) {
			f.release(c.id)
		}
		if err != nil && firstErr == nil {
			firstErr = err
		}
	}
	for off := alo; off < ahi && firstErr == nil; {
		n := int(min(int64(f.chunk), ahi-off))
		var id uint16
		var err error
		// Wait for our own oldest chunk rather than block on a tag while
		// holding others: that is what keeps big calls from deadlocking.
		for {
			select {
			case id = <-f.free:
			default:
				if len(queue) > 0 {
					finish()
					continue
				}
				id, err = f.acquire()
			}
			break
		}
		if err != nil {
			firstErr = err
			break
		}
		c := sub(off, n)
		c.id = id
		if fill != nil {
			fill(&c, f.tags[id].mem)
		}
		if err := f.submit(id, op, off, n, false); err != nil {
			if !errors.Is(err, ErrClosed) {
				f.release(id)
			}
			firstErr = err
			break
		}
		queue = append(queue, c)
		off += int64(n)
	}
	for len(queue) > 0 {
		finish()
	}
	return firstErr
}

// ReadAt reads len(p) bytes of the guest's disk at off. Reads past the end
// return the bytes up to it and io.EOF.
func (f *Frontend) ReadAt(p []byte, off int64) (int, error) {
	size, _, err := f.enter()
	if err != nil {
		return 0, err
	}
	defer f.leave()
	if off < 0 {
		return 0, fmt.Errorf("frontend: negative offset %d", off)
	}
	if off >= size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	want := p
	if int64(len(p)) > size-off {
		want = p[:size-off]
	}
	if len(want) == 0 {
		return 0, nil
	}
	end := off + int64(len(want))
	alo, ahi := off&^(sector-1), (end+sector-1)&^(sector-1)
	sub := func(coff int64, n int) inflight {
		lo, hi := max(coff, off), min(coff+int64(n), end)
		return inflight{off: coff, n: n, pOff: int(lo - off), skip: int(lo - coff), k: int(hi - lo)}
	}
	err = f.rw(blkif.OpRead, alo, ahi, nil, func(c *inflight, mem []byte) {
		copy(want[c.pOff:c.pOff+c.k], mem[c.skip:c.skip+c.k])
	}, sub)
	if err != nil {
		return 0, err
	}
	if len(want) < len(p) {
		return len(want), io.EOF
	}
	return len(p), nil
}

// WriteAt writes p to the guest's disk at off; it returns once the backend
// has answered every request (the data is in the image).
func (f *Frontend) WriteAt(p []byte, off int64) (int, error) {
	size, ro, err := f.enter()
	if err != nil {
		return 0, err
	}
	defer f.leave()
	if ro {
		return 0, ErrReadOnly
	}
	if err := image.CheckRange(off, len(p), size); err != nil {
		return 0, fmt.Errorf("frontend: %w", err)
	}
	if len(p) == 0 {
		return 0, nil
	}
	end := off + int64(len(p))
	// Split into an unaligned head, an aligned middle and an unaligned
	// tail; head and tail are empty when their end is aligned.
	headEnd := off
	if off&(sector-1) != 0 {
		headEnd = min(end, (off+sector-1)&^(sector-1))
		if err := f.rmwRange(p[:headEnd-off], off); err != nil {
			return 0, err
		}
	}
	tailStart := max(headEnd, end&^(sector-1))
	if headEnd < tailStart {
		mid := p[headEnd-off : tailStart-off]
		sub := func(coff int64, n int) inflight { return inflight{off: coff, n: n, pOff: int(coff - headEnd)} }
		err := f.rw(blkif.OpWrite, headEnd, tailStart, func(c *inflight, mem []byte) {
			copy(mem[:c.n], mid[c.pOff:c.pOff+c.n])
		}, nil, sub)
		if err != nil {
			return 0, err
		}
	}
	if tailStart < end {
		if err := f.rmwRange(p[tailStart-off:], tailStart); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// StartMax is the longest request StartRead and StartWrite take: one ring
// request (11 pages, or the indirect size both sides agreed on).
func (f *Frontend) StartMax() int { return f.chunk }

// StartRead starts reading [off, off+n) and returns without waiting: off
// and n are multiples of 512, 0 < n <= StartMax, inside the disk. c gets
// the bytes (or the error) on the reaper goroutine, with cookie. The
// request is held back until Publish (see the package doc). An error
// returned here means nothing was started and c is not called. It blocks
// only while every tag is in flight.
func (f *Frontend) StartRead(off int64, n int, c Completer, cookie uint64) error {
	return f.start(blkif.OpRead, off, n, nil, c, cookie)
}

// StartWrite is StartRead for writing p at off (p is copied before it
// returns). Complete's error is nil once the data is in the image.
func (f *Frontend) StartWrite(p []byte, off int64, c Completer, cookie uint64) error {
	return f.start(blkif.OpWrite, off, len(p), p, c, cookie)
}

func (f *Frontend) start(op uint8, off int64, n int, p []byte, c Completer, cookie uint64) error {
	if err := f.enterStart(op, off, n); err != nil {
		return err
	}
	defer f.leave()
	id, err := f.takeFree()
	if err != nil {
		return err
	}
	if p != nil {
		copy(f.tags[id].mem, p)
	}
	err = f.launch(id, op, off, n, c, cookie)
	if err != nil && !errors.Is(err, ErrClosed) {
		f.release(id)
	}
	return err
}

// takeFree takes a free tag for a Start or TakeTag caller, which may hold
// requests back: when every tag is in flight, those must go out first,
// or no tag comes back.
func (f *Frontend) takeFree() (uint16, error) {
	select {
	case id := <-f.free:
		return id, nil
	default:
	}
	if err := f.Publish(); err != nil {
		return 0, err
	}
	return f.acquire()
}

// enterStart admits a Start call (enter) and checks its request; on
// success the caller must leave.
func (f *Frontend) enterStart(op uint8, off int64, n int) error {
	size, ro, err := f.enter()
	if err != nil {
		return err
	}
	switch {
	case op == blkif.OpWrite && ro:
		err = ErrReadOnly
	case n <= 0 || n > f.chunk || off%sector != 0 || n%sector != 0:
		err = fmt.Errorf("frontend: %s of %d bytes at %d: not a single aligned request", blkif.OpName(op), n, off)
	default:
		if err = image.CheckRange(off, n, size); err != nil {
			err = fmt.Errorf("frontend: %w", err)
		}
	}
	if err != nil {
		f.leave()
	}
	return err
}

// launch pushes a started request on tag id (held back until Publish);
// the reaper runs c when it completes.
func (f *Frontend) launch(id uint16, op uint8, off int64, n int, c Completer, cookie uint64) error {
	t := &f.tags[id]
	t.cb, t.cookie, t.op, t.n = c, cookie, op, n
	if err := f.submit(id, op, off, n, true); err != nil {
		t.cb = nil
		return err
	}
	return nil
}

// rmwRange writes b at off, where [off, off+len(b)) lies within at most
// two sectors and is not sector-aligned: read the sectors, patch, write.
func (f *Frontend) rmwRange(b []byte, off int64) error {
	f.rmw.Lock()
	defer f.rmw.Unlock()
	alo, ahi := off&^(sector-1), (off+int64(len(b))+sector-1)&^(sector-1)
	buf := make([]byte, ahi-alo)
	sub := func(coff int64, n int) inflight { return inflight{off: coff, n: n} }
	if err := f.rw(blkif.OpRead, alo, ahi, nil, func(c *inflight, mem []byte) {
		copy(buf, mem[:c.n])
	}, sub); err != nil {
		return err
	}
	copy(buf[off-alo:], b)
	return f.rw(blkif.OpWrite, alo, ahi, func(c *inflight, mem []byte) {
		copy(mem[:c.n], buf)
	}, nil, sub)
}

// Flush asks the backend to make every completed write durable
// (BLKIF_OP_FLUSH_DISKCACHE) and waits for its answer.
func (f *Frontend) Flush() error {
	if _, _, err := f.enter(); err != nil {
		return err
	}
	defer f.leave()
	return f.single(blkif.OpFlushDiskcache, 0, 0)
}

// single runs one request that carries no data.
func (f *Frontend) single(op uint8, off int64, n int) error {
	id, err := f.acquire()
	if err != nil {
		return err
	}
	if err := f.submit(id, op, off, n, false); err != nil {
		if !errors.Is(err, ErrClosed) {
			f.release(id)
		}
		return err
	}
	err = f.wait(id, op)
	if err == nil || !errors.Is(err, ErrClosed) {
		f.release(id)
	}
	return err
}

// maxDiscard keeps a discard request's byte count in an int.
const maxDiscard = 1 << 30

// Discard tells the backend [off, off+length) is no longer needed
// (BLKIF_OP_DISCARD); afterwards the range reads as zeros. Partial
// sectors at either end are written with zeros instead, and so is the
// whole range when the backend did not publish feature-discard (slow but
// true to the contract: NBD's WRITE_ZEROES falls back on Discard).
func (f *Frontend) Discard(off, length int64) error {
	size, ro, err := f.enter()
	if err != nil {
		return err
	}
	if ro {
		f.leave()
		return ErrReadOnly
	}
	if err := image.CheckRange64(off, length, size); err != nil {
		f.leave()
		return fmt.Errorf("frontend: discard: %w", err)
	}
	end := off + length
	lo, hi := (off+sector-1)&^(sector-1), end&^(sector-1)
	if lo >= hi || !f.features.Discard {
		f.leave()
		return f.writeZeros(off, length)
	}
	for o := lo; o < hi; o += maxDiscard {
		if err := f.single(blkif.OpDiscard, o, int(min(maxDiscard, hi-o))); err != nil {
			f.leave()
			return err
		}
	}
	f.leave()
	// The edges, after leaving: WriteAt enters on its own.
	if err := f.writeZeros(off, lo-off); err != nil {
		return err
	}
	return f.writeZeros(hi, end-hi)
}

// zeroChunk bounds the buffer writeZeros allocates.
const zeroChunk = 1 << 20

// writeZeros writes zeros over [off, off+n) in chunks.
func (f *Frontend) writeZeros(off, n int64) error {
	if n <= 0 {
		return nil
	}
	zeros := make([]byte, min(n, zeroChunk))
	for n > 0 {
		k := min(n, zeroChunk)
		if _, err := f.WriteAt(zeros[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}
