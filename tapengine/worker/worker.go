// Package worker is the per-disk worker process and the daemon's handle on
// it. Each attached disk is served by its own process (the same binary,
// re-executed as the hidden subcommand `blktap __worker`), so a crash or a
// hostile guest is contained to one disk and each disk can be policed on
// its own (DESIGN.md, "Process model").
//
// The daemon and the worker talk over a SOCK_SEQPACKET socket pair, the
// worker's end inherited as descriptor 3. Each message is one JSON datagram,
// descriptors ride beside it as SCM_RIGHTS. The daemon's duties:
//
//  1. Start the worker (Start), then send OpOpen: the worker opens the image.
//  2. For a domain-0 disk, create the export's listening socket and send
//     OpServeNBD with it; the daemon keeps its own copy, so the socket
//     outlives a worker restart.
//  3. For a guest disk, once the frontend published its ring, send
//     OpConnect with the transport's descriptors (local transport: the
//     grant memfd, the kick eventfd, the notify eventfd).
//  4. To stop, send OpClose: the worker drains requests, flushes, closes the
//     image and exits 0. If the daemon's end closes, the worker does the same.
//
// Every request gets exactly one Reply, in order.
package worker

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/rbd"
	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/local"
	"github.com/blktap-go/blktap/tapengine/nbd"
	"github.com/blktap-go/blktap/tapengine/ring"
	"github.com/blktap-go/blktap/tapengine/xen"
	"golang.org/x/sys/unix"
)

// ControlFD is the descriptor a worker inherits its control socket on.
const ControlFD = 3

// AdoptFD is where a worker inherits the listening socket a restarted
// daemon reconnects to (optional).
const AdoptFD = 4

// maxChain bounds a backing chain: deeper chains are refused, which also
// ends loops the path check misses (hard links, bind mounts).
const maxChain = 16

// Main runs a worker on the inherited control socket and returns the exit
// status. It never panics on bad requests: each gets an error reply.
//
// With adopt set, descriptor 4 is a listening socket on which a daemon
// started later can adopt this worker (never touched otherwise: the
// runtime may have put one of its own descriptors there).
func Main(logger *slog.Logger, adopt bool) int {
	var af *os.File
	if adopt {
		af = os.NewFile(AdoptFD, "adopt") // before anything else opens a descriptor
	}
	f := os.NewFile(ControlFD, "control")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		logger.Error("worker: control socket", "err", err)
		return 2
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		logger.Error("worker: control socket is not a unix socket")
		return 2
	}
	w := &worker{logger: logger}
	if af != nil {
		if ln, err := net.FileListener(af); err == nil {
			if ul, ok := ln.(*net.UnixListener); ok {
				ul.SetUnlinkOnClose(false) // the daemon owns the path
				w.adopt = ul
			} else {
				ln.Close()
			}
		}
		af.Close()
	}
	return w.run(uc)
}

type worker struct {
	logger *slog.Logger
	name   string
	adopt  *net.UnixListener // a later daemon connects here; nil: none

	nbdLn net.Listener // the export's listening socket, for a new daemon to keep

	img      *gate     // holds and swaps the image under every consumer
	io       *throttle // what every consumer calls: QoS over the gate
	lock     *os.File  // holds the image's flock while the image is open
	readOnly bool
	paused   bool
	format   string // of the image behind the gate
	path     string
	size     int64 // fixed for the worker's life: consumers know it

	nbdSrv    *nbd.Server
	nbdCancel context.CancelFunc
	nbdDone   chan struct{}

	ring ringState

	idleStop context.CancelFunc // stops the idle trimmer (idle.go)
}

// ringState is the disk's rings: one per queue (blkif multi-queue), all
// serving the same image, their counters added up.
type ringState struct {
	mu     sync.Mutex
	queues map[int]*queueState
	err    error // why a ring stopped on its own
	stats  ring.Stats
}

type queueState struct {
	cancel    context.CancelFunc
	done      chan struct{}
	running   bool
	transport string // Request.Transport of the connect
}

// maxQueues bounds blkif multi-queue (Linux blkback allows one per CPU).
const maxQueues = 16

// running reports whether a queue's ring runs, and over which transport
// (the lowest running queue's, should queues ever differ).
func (r *ringState) running() (transport string, ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	low := -1
	for i, q := range r.queues {
		if q.running && (low < 0 || i < low) {
			low, transport = i, q.transport
		}
	}
	return transport, low >= 0
}

// run serves control connections: the daemon's, and after the daemon is
// gone, the next daemon's on the adopt socket. A worker whose daemon dies
// keeps serving its consumers, so a daemon restart detaches nobody.
func (w *worker) run(c *net.UnixConn) int {
	for {
		closed, err := w.serveControl(c)
		c.Close()
		if closed {
			return 0
		}
		if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
			w.logger.Error("worker: control", "err", err)
		}
		if w.adopt == nil || w.img == nil {
			w.logger.Info("worker: daemon gone; shutting down")
			w.shutdown()
			return 0
		}
		w.logger.Info("worker: daemon gone; serving on until a daemon adopts this disk")
		for {
			ac, err := w.adopt.AcceptUnix()
			if err != nil {
				w.logger.Error("worker: adopt socket", "err", err)
				w.shutdown()
				return 1
			}
			c = ac
			break
		}
		w.logger.Info("worker: adopted by a daemon")
	}
}

// serveControl answers requests on one control connection until it ends
// (err) or the daemon closes the disk (closed).
func (w *worker) serveControl(c *net.UnixConn) (closed bool, err error) {
	for {
		var req Request
		fds, err := recv(c, time.Time{}, &req)
		if err != nil {
			return false, err
		}
		rep, out := w.handleFDs(&req, fds)
		rep.Version = ProtocolVersion
		err = send(c, time.Now().Add(10*time.Second), rep, out)
		closeAll(out)
		if err != nil {
			return false, err
		}
		if req.Op == OpClose && rep.OK {
			if w.adopt != nil {
				w.adopt.Close()
			}
			return true, nil
		}
	}
}

// handleFDs is handle for requests whose reply carries descriptors.
func (w *worker) handleFDs(req *Request, fds []int) (Reply, []int) {
	switch req.Op {
	case OpDescribe:
		closeAll(fds)
		return w.describe(), nil
	case OpExportFD:
		closeAll(fds)
		if w.nbdLn == nil {
			return fail(fmt.Errorf("%w: no export served", errInvalid)), nil
		}
		f, err := listenerFileOf(w.nbdLn)
		if err != nil {
			return fail(err), nil
		}
		fd, err := unix.Dup(int(f.Fd()))
		f.Close()
		if err != nil {
			return fail(err), nil
		}
		return Reply{OK: true}, []int{fd}
	}
	return w.handle(req, fds), nil
}

func listenerFileOf(ln net.Listener) (*os.File, error) {
	switch l := ln.(type) {
	case *net.UnixListener:
		return l.File()
	case *net.TCPListener:
		return l.File()
	}
	return nil, fmt.Errorf("listener %T cannot be handed over", ln)
}

// describe says what the worker serves, for a daemon adopting it.
func (w *worker) describe() Reply {
	transport, ring := w.ring.running()
	return Reply{OK: true, Describe: &Describe{
		Pid: os.Getpid(), Name: w.name, Format: w.format, Path: w.path,
		ReadOnly: w.readOnly, Size: w.size, Paused: w.paused,
		Open: w.img != nil, NBD: w.nbdSrv != nil, Ring: ring, Transport: transport,
	}}
}

func fail(err error) Reply {
	return Reply{Error: err.Error(), Class: ErrorClass(err)}
}

// ErrorClass names the class of err for the daemon's retry policy.
func ErrorClass(err error) string {
	switch {
	case errors.Is(err, image.ErrCorrupt):
		return "corrupt"
	case errors.Is(err, image.ErrUnsupported):
		return "unsupported"
	case errors.Is(err, image.ErrWrongFormat):
		return "wrong-format"
	case errors.Is(err, image.ErrReadOnly):
		return "read-only"
	case errors.Is(err, fs.ErrNotExist):
		return "not-found"
	case errors.Is(err, fs.ErrPermission):
		return "permission"
	case errors.Is(err, ErrInUse), errors.Is(err, formats.ErrLocked):
		return "in-use"
	case errors.Is(err, rbd.ErrLocked):
		// Another host writes the image: retried, since it lets go when
		// it pauses, detaches or is fenced (live migration's handoff).
		return "locked"
	case errors.Is(err, ErrProtocol), errors.Is(err, errInvalid):
		return "invalid"
	}
	return ""
}

var errInvalid = errors.New("invalid request")

func (w *worker) handle(req *Request, fds []int) (rep Reply) {
	defer func() {
		// A bug here must not take the disk down with an unanswered request.
		if r := recover(); r != nil {
			closeAll(fds)
			w.logger.Error("worker: panic handling request", "op", req.Op, "panic", r)
			rep = fail(fmt.Errorf("internal error handling %s: %v", req.Op, r))
		}
	}()
	if req.Version != ProtocolVersion {
		closeAll(fds)
		return fail(fmt.Errorf("%w: control protocol version %d, want %d", errInvalid, req.Version, ProtocolVersion))
	}
	switch req.Op {
	case OpOpen:
		closeAll(fds)
		return w.open(req)
	case OpServeNBD:
		return w.serveNBD(req, fds)
	case OpConnect:
		return w.connect(req, fds)
	case OpDisconnect:
		closeAll(fds)
		w.stopRing()
		return Reply{OK: true}
	case OpStats:
		closeAll(fds)
		return w.statsReply()
	case OpFlush:
		closeAll(fds)
		if w.img == nil {
			return fail(fmt.Errorf("%w: no image open", errInvalid))
		}
		if w.paused {
			return Reply{OK: true} // pause flushed and closed the image
		}
		if err := w.img.Flush(); err != nil {
			return fail(err)
		}
		return Reply{OK: true}
	case OpQoS:
		closeAll(fds)
		if w.io == nil {
			return fail(fmt.Errorf("%w: no image open", errInvalid))
		}
		if req.IOPS < 0 || req.Bandwidth < 0 {
			return fail(fmt.Errorf("%w: negative QoS limits", errInvalid))
		}
		w.io.set(req.IOPS, req.Bandwidth)
		w.logger.Info("worker: qos", "iops", req.IOPS, "bandwidth", req.Bandwidth)
		return Reply{OK: true}
	case OpPause:
		closeAll(fds)
		return w.pause()
	case OpResume:
		closeAll(fds)
		return w.resume(req)
	case OpClose:
		closeAll(fds)
		if err := w.shutdown(); err != nil {
			return fail(err)
		}
		return Reply{OK: true}
	}
	closeAll(fds)
	return fail(fmt.Errorf("%w: unknown op %q", errInvalid, req.Op))
}

func (w *worker) open(req *Request) Reply {
	if w.img != nil {
		return fail(fmt.Errorf("%w: an image is already open", errInvalid))
	}
	w.name = req.Name
	w.logger = w.logger.With("disk", req.Name)
	img, lock, err := w.openImage(req.Format, req.Path, req.ReadOnly, req.AllowDirs)
	if err != nil {
		return fail(err)
	}
	w.img, w.lock = &gate{img: img}, lock
	w.io = &throttle{Image: w.img}
	w.idleStop = w.startIdleTrim()
	_, noMedium := img.(image.Empty)
	w.readOnly, w.format, w.path, w.size = req.ReadOnly || noMedium, req.Format, req.Path, img.Size()
	w.logger.Info("worker: image open", "format", req.Format, "path", req.Path, "size", img.Size(), "readonly", w.readOnly)
	return Reply{OK: true, Size: img.Size(), SectorSize: blkif.SectorSize}
}

// openImage opens and locks an image; allow confines its backing chain
// (empty: the image's own directory).
func (w *worker) openImage(format, path string, readOnly bool, allow []string) (image.Image, *os.File, error) {
	if format == "" && path == "" {
		// A CD-ROM drive with no disc in it (the daemon asks only for
		// device-type cdrom): no sectors, nothing to lock.
		return image.Empty{}, nil, nil
	}
	isFile := formats.IsFile(format)
	if isFile && !filepath.IsAbs(path) {
		return nil, nil, fmt.Errorf("%w: image path %q is not absolute", errInvalid, path)
	}
	if len(allow) == 0 {
		allow = []string{filepath.Dir(path)}
	}
	// A RAM disk is shared by design and an nbd image lives elsewhere:
	// only image files are locked.
	var lock *os.File
	if isFile {
		var err error
		if lock, err = lockImage(path, readOnly); err != nil {
			return nil, nil, err
		}
	}
	img, err := formats.Open(format, path, formats.Options{
		ReadOnly: readOnly,
		Backing:  BackingOpener(path, allow, 0),
		Logger:   w.logger,
	})
	if err != nil {
		if lock != nil {
			lock.Close()
		}
		return nil, nil, err
	}
	return img, lock, nil
}

// pause holds every consumer's I/O after the requests in flight, then
// flushes and closes the image and releases its lock, so another program
// may use the file until resume.
func (w *worker) pause() Reply {
	if w.img == nil {
		return fail(fmt.Errorf("%w: no image open", errInvalid))
	}
	if w.paused {
		return fail(fmt.Errorf("%w: already paused", errInvalid))
	}
	img := w.img.pause()
	w.paused = true
	err := img.Close() // flushes first
	if w.lock != nil {
		w.lock.Close()
		w.lock = nil
	}
	if err != nil {
		// The image is gone either way; resume reopens it.
		w.logger.Error("worker: pause: close", "err", err)
		return fail(err)
	}
	w.logger.Info("worker: paused")
	return Reply{OK: true, Size: w.size}
}

// resume reopens the image, or opens the one the request names (a
// snapshot overlay, say), and releases the held I/O. The new image must
// have the size the consumers know.
func (w *worker) resume(req *Request) Reply {
	if !w.paused {
		return fail(fmt.Errorf("%w: not paused", errInvalid))
	}
	format, path := w.format, w.path
	if req.Path != "" {
		format, path = req.Format, req.Path
	}
	img, lock, err := w.openImage(format, path, w.readOnly, req.AllowDirs)
	if err != nil {
		return fail(err) // still paused: the daemon may try another image
	}
	if img.Size() != w.size {
		img.Close()
		if lock != nil {
			lock.Close()
		}
		return fail(fmt.Errorf("%w: %s is %d bytes, the disk is %d", errInvalid, path, img.Size(), w.size))
	}
	w.lock, w.format, w.path, w.paused = lock, format, path, false
	w.img.resume(img)
	w.logger.Info("worker: resumed", "format", format, "path", path)
	return Reply{OK: true, Size: w.size}
}

// BackingOpener returns the function a format uses to open the backing file
// its image at child names: relative names resolve against the child's
// directory, the result must lie inside one of allow, the chain is
// depth-limited, and every backing image is opened read-only.
func BackingOpener(child string, allow []string, depth int) image.OpenFunc {
	return func(name, format string) (image.Image, error) {
		if depth+1 >= maxChain {
			return nil, fmt.Errorf("%w: backing chain deeper than %d", image.ErrUnsupported, maxChain)
		}
		p := name
		if !filepath.IsAbs(p) {
			p = filepath.Join(filepath.Dir(child), p)
		}
		real, err := filepath.EvalSymlinks(p)
		if err != nil {
			return nil, fmt.Errorf("backing file %q: %w", name, err)
		}
		if !insideAny(real, allow) {
			return nil, fmt.Errorf("%w: backing file %q lies outside the allowed directories %v", fs.ErrPermission, name, allow)
		}
		if format == "" {
			// Probed, never trusted for writing: the opener only opens
			// read-only, so a probe that says "raw" cannot turn a header
			// into guest data that is then written back.
			if format, err = formats.Probe(real); err != nil {
				return nil, fmt.Errorf("backing file %q: %w", name, err)
			}
		}
		return formats.Open(format, real, formats.Options{
			ReadOnly: true,
			Backing:  BackingOpener(real, allow, depth+1),
		})
	}
}

// ErrInUse reports an image another disk holds open for writing (or one
// this disk wants to write that another holds open at all).
var ErrInUse = errors.New("image is in use by another disk")

// lockImage takes a flock on path: exclusive for a writable disk, shared
// for a read-only one, so two disks never write one image and nobody reads
// an image that another disk writes. The lock lives on its own open file
// description and dies with the worker, so a crashed worker never leaves
// an image locked.
func lockImage(path string, readOnly bool) (*os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	how := unix.LOCK_EX
	if readOnly {
		how = unix.LOCK_SH
	}
	for {
		err = unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		if err == unix.EWOULDBLOCK {
			return nil, fmt.Errorf("%w: %s", ErrInUse, path)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return f, nil
}

func insideAny(p string, dirs []string) bool {
	for _, d := range dirs {
		if rd, err := filepath.EvalSymlinks(d); err == nil {
			d = rd
		}
		d = filepath.Clean(d)
		if p == d || strings.HasPrefix(p, d+string(filepath.Separator)) || d == "/" {
			return true
		}
	}
	return false
}

func (w *worker) serveNBD(req *Request, fds []int) Reply {
	if len(fds) != 1 {
		closeAll(fds)
		return fail(fmt.Errorf("%w: serve-nbd wants one listening socket, got %d descriptors", errInvalid, len(fds)))
	}
	if w.img == nil {
		closeAll(fds)
		return fail(fmt.Errorf("%w: no image open", errInvalid))
	}
	if w.nbdSrv != nil {
		closeAll(fds)
		return fail(fmt.Errorf("%w: already serving NBD", errInvalid))
	}
	var tlsConfig *tls.Config
	if req.TLSCert != "" {
		var err error
		if tlsConfig, err = nbd.LoadTLSConfig(req.TLSCert, req.TLSKey, req.TLSCA); err != nil {
			closeAll(fds)
			return fail(fmt.Errorf("%w: %v", errInvalid, err))
		}
	}
	f := os.NewFile(uintptr(fds[0]), "nbd-listener")
	ln, err := net.FileListener(f)
	f.Close()
	if err != nil {
		return fail(fmt.Errorf("nbd listener: %w", err))
	}
	w.nbdLn = ln
	srv := &nbd.Server{
		Export: nbd.Export{
			Name:        req.Name,
			Description: "blktap " + req.Name,
			Backend:     w.io,
			ReadOnly:    w.readOnly,
			// A local file's writes never wait on a later request.
			InlineWrites: formats.IsFile(w.format),
		},
		Logger:    w.logger,
		TLSConfig: tlsConfig,
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ctx, ln); err != nil && ctx.Err() == nil {
			w.logger.Error("worker: nbd export stopped", "err", err)
		}
	}()
	w.nbdSrv, w.nbdCancel, w.nbdDone = srv, cancel, done
	return Reply{OK: true}
}

func (w *worker) connect(req *Request, fds []int) Reply {
	if w.img == nil {
		closeAll(fds)
		return fail(fmt.Errorf("%w: no image open", errInvalid))
	}
	proto, err := blkif.ParseProtocol(req.Protocol)
	if err != nil {
		closeAll(fds)
		return fail(fmt.Errorf("%w: %v", errInvalid, err))
	}
	if req.Queue < 0 || req.Queue >= maxQueues {
		closeAll(fds)
		return fail(fmt.Errorf("%w: queue %d (at most %d queues)", errInvalid, req.Queue, maxQueues))
	}
	w.ring.mu.Lock()
	if w.ring.queues == nil {
		w.ring.queues = map[int]*queueState{}
	}
	q := w.ring.queues[req.Queue]
	running := q != nil && q.running
	w.ring.mu.Unlock()
	if running {
		closeAll(fds)
		return fail(fmt.Errorf("%w: queue %d is already connected", errInvalid, req.Queue))
	}
	var t ring.Transport
	switch req.Transport {
	case "local":
		if len(fds) != 3 {
			closeAll(fds)
			return fail(fmt.Errorf("%w: the local transport wants 3 descriptors (memfd, kick, notify), got %d", errInvalid, len(fds)))
		}
		if t, err = local.Attach(fds[0], req.RingRefs, fds[1], fds[2]); err != nil {
			return fail(err)
		}
	case "xen":
		closeAll(fds)
		dev, err := xen.OpenDevice()
		if err != nil {
			return fail(fmt.Errorf("%w: %v", image.ErrUnsupported, err))
		}
		if t, err = xen.Attach(dev, xen.Options{
			Domid: req.Domid, RingRefs: req.RingRefs, EventChannel: req.EventChannel,
			PersistentGrants: req.Persistent, Logger: w.logger,
		}); err != nil {
			return fail(fmt.Errorf("%w: %v", errInvalid, err))
		}
	default:
		closeAll(fds)
		return fail(fmt.Errorf("%w: transport %q", errInvalid, req.Transport))
	}
	ctx, cancel := context.WithCancel(context.Background())
	qs := &queueState{cancel: cancel, done: make(chan struct{}), running: true, transport: req.Transport}
	w.ring.mu.Lock()
	w.ring.queues[req.Queue], w.ring.err = qs, nil
	w.ring.mu.Unlock()
	go func() {
		defer close(qs.done)
		defer t.Close()
		opts := RingOptions(w.readOnly)
		opts.Logger, opts.Stats = w.logger.With("queue", req.Queue), &w.ring.stats
		err := ring.Serve(ctx, t, proto, w.io, opts)
		w.ring.mu.Lock()
		qs.running = false
		if err != nil && ctx.Err() == nil {
			w.ring.err = err
		}
		w.ring.mu.Unlock()
		if err != nil && ctx.Err() == nil {
			w.logger.Error("worker: ring stopped", "queue", req.Queue, "err", err)
		}
	}()
	w.logger.Info("worker: ring connected", "queue", req.Queue, "protocol", proto.String(), "refs", req.RingRefs)
	return Reply{OK: true}
}

// RingOptions are what a worker serves a ring with; the daemon publishes
// the matching feature keys from them (ring.Options.Features).
func RingOptions(readOnly bool) ring.Options {
	return ring.Options{ReadOnly: readOnly, Discard: true, MaxIndirectSegments: 256, Persistent: true}
}

// stopRing stops every queue's ring; each drains, answers what it took
// and flushes.
func (w *worker) stopRing() {
	w.ring.mu.Lock()
	queues := w.ring.queues
	w.ring.queues = nil
	w.ring.mu.Unlock()
	for _, q := range queues {
		q.cancel()
	}
	for _, q := range queues {
		<-q.done
	}
}

func (w *worker) statsReply() Reply {
	var st Stats
	rs := &w.ring.stats
	st.RingRequests = rs.Reads.Load() + rs.Writes.Load() + rs.Flushes.Load() + rs.Barriers.Load() + rs.Discards.Load()
	st.RingErrors = rs.Errors.Load()
	st.BytesRead += rs.BytesRead.Load()
	st.BytesWritten += rs.BytesWritten.Load()
	st.Flushes += rs.Flushes.Load()
	st.RingReads, st.RingWrites = rs.Reads.Load(), rs.Writes.Load()
	st.RingFlushes, st.RingDiscards = rs.Flushes.Load()+rs.Barriers.Load(), rs.Discards.Load()
	if w.nbdSrv != nil {
		ns := w.nbdSrv.Stats()
		st.NBDReads = ns.Reads
		st.NBDWrites = ns.Writes
		st.BytesRead += ns.BytesRead
		st.BytesWritten += ns.BytesWritten
		st.Flushes += ns.Flushes
		st.NBDFlushes, st.NBDTrims, st.NBDErrors, st.NBDActive = ns.Flushes, ns.Trims, ns.Errors, ns.Active
	}
	if w.io != nil {
		st.Latency, st.InFlight = w.io.meter.snapshot()
	}
	rep := Reply{OK: true, Stats: &st}
	w.ring.mu.Lock()
	if w.ring.err != nil {
		rep.RingError = w.ring.err.Error()
	}
	w.ring.mu.Unlock()
	rep.Size = w.size // never through the gate: it may be paused
	rep.Paused = w.paused
	return rep
}

// shutdown drains and stops every consumer, then flushes and closes the
// image. It is idempotent.
func (w *worker) shutdown() error {
	if w.idleStop != nil {
		w.idleStop()
		w.idleStop = nil
	}
	if w.img != nil && w.paused {
		// Consumers blocked in the gate must return before they stop.
		w.img.resume(closedImage{size: w.size})
		w.paused = false
	}
	w.stopRing()
	if w.nbdCancel != nil {
		w.nbdCancel()
		w.nbdSrv.Close()
		<-w.nbdDone
		w.nbdCancel = nil
	}
	if w.img == nil {
		return nil
	}
	if w.paused {
		// Held calls end with ErrClosed; nothing is left to flush.
		w.img.resume(closedImage{size: w.size})
		w.paused = false
	}
	img := w.img
	w.img = nil
	defer func() {
		if w.lock != nil {
			w.lock.Close() // releases the flock, after the image is closed
			w.lock = nil
		}
	}()
	if err := img.Close(); err != nil {
		w.logger.Error("worker: close image", "err", err)
		return err
	}
	w.logger.Info("worker: image closed")
	return nil
}
