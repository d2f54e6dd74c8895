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
//
// The package's files, by concern: frontend.go (setup, connect, close),
// tags.go (request tags and the free list), submit.go (putting a request
// on the ring), reaper.go (collecting responses), blocking.go (ReadAt,
// WriteAt, Flush, Discard), async.go (StartRead, StartWrite), lend.go
// (tags lent as buffers) and trim.go (giving idle pages back).
package frontend

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

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
//
// Three locks, taken in this order (a goroutine holding one may take a
// later one, never an earlier one):
//
//  1. life (read side): held by every call while it touches the shared
//     memory; Close takes the write side to wait for them to leave
//     before it unmaps. Not reentrant: with Close waiting, a second read
//     lock blocks forever, so no call holding it calls another method
//     that enters (Discard leaves before it writes zeros).
//  2. rmw: serialises the read-modify-write of partial sectors, so
//     disjoint unaligned writes into one sector keep each other's bytes.
//     Held across the ring round trips of one read and one write.
//  3. mu: the ring's producer side, the grant states and the fields
//     below it. Never held across a wait, a channel send or a Completer
//     call.
//
// The free list (free) is a channel, so it needs no lock; a tag taken
// from it belongs to its taker (see tag).
type Frontend struct {
	// Fixed by New.
	opts     Options
	log      *slog.Logger
	gt       *local.GrantTable
	ch       *local.Channel
	rings    uint32 // first ring ref
	tags     []tag
	free     chan uint16   // ids of the tags nobody holds
	segs     int           // data pages per tag: 11, or more for indirect requests
	closedCh chan struct{} // closed when the frontend stops (Done)

	// Set by SetFeatures (under mu) before Connect, read-only afterwards.
	features Features
	chunk    int // bytes per request: 11 pages, or the indirect size

	// Set by Connect (under mu). The reaper reads notifyFile; Close
	// closes it only once the reaper is gone.
	notifyFile *os.File      // a dup of the notify eventfd, read through the netpoller
	reaperDone chan struct{} // closed when the reaper returns

	life sync.RWMutex // see lock order 1
	rmw  sync.Mutex   // see lock order 2

	mu         sync.Mutex // see lock order 3; guards what follows
	front      *ring.Front
	connected  bool
	closed     bool
	released   bool // Close ran: memory and descriptors go or went
	closeErr   error
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
	if opts.MaxIndirectSegments > blkif.SegmentsMax {
		f.segs = min(opts.MaxIndirectSegments, blkif.IndirectPagesMax*blkif.SegmentsPerIndirect, PageBudget/entries)
		f.segs = max(f.segs, blkif.SegmentsMax)
	}
	f.chunk = blkif.SegmentsMax * pageSize
	gt, err := local.NewGrantTable(ringPages + entries*(f.segs+f.indirectPages()))
	if err != nil {
		return nil, err
	}
	f.gt = gt
	if err := f.setUp(ringPages, entries); err != nil {
		if f.ch != nil {
			f.ch.Close()
		}
		gt.Close()
		return nil, err
	}
	return f, nil
}

// setUp lays out the grant table New allocated: the ring pages first
// (initialised and granted), then each tag's pages; then it creates the
// event channel.
func (f *Frontend) setUp(ringPages, entries int) error {
	var err error
	if f.rings, err = f.gt.Alloc(ringPages); err != nil {
		return err
	}
	if f.front, err = ring.NewFront(f.gt.Memory(f.rings, ringPages), f.opts.Protocol); err != nil {
		return err
	}
	f.front.Init()
	for i := range ringPages {
		if err := f.gt.Grant(f.rings+uint32(i), false); err != nil {
			return err
		}
	}
	if err := f.allocTags(entries); err != nil {
		return err
	}
	f.ch, err = local.NewChannel()
	return err
}

// RingRefs are the grant refs of the ring pages, in order.
func (f *Frontend) RingRefs() []uint32 {
	refs := make([]uint32, 1<<f.opts.RingOrder)
	for i := range refs {
		refs[i] = f.rings + uint32(i)
	}
	return refs
}

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

// fail stops the frontend on its own (the backend broke the ring, the
// notify eventfd failed); Close still has to release it.
func (f *Frontend) fail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failLocked(err)
}
