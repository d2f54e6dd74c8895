// Package worker is the per-disk worker process and the daemon's handle on
// it. Each attached disk is served by its own process (the same binary,
// re-executed as the hidden subcommand `blktap __worker`), so a crash or a
// hostile guest is contained to one disk and each disk can be policed on
// its own (docs/ARCHITECTURE.md, section "Process model").
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
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/rbd"
	"github.com/blktap-go/blktap/tapengine/nbd"
	"golang.org/x/sys/unix"
)

// ControlFD is the descriptor a worker inherits its control socket on.
const ControlFD = 3

// AdoptFD is where a worker inherits the listening socket a restarted
// daemon reconnects to (optional).
const AdoptFD = 4

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
	uring    bool   // raw images do their I/O through io_uring (uring.go)
	path     string
	size     int64 // fixed for the worker's life: consumers know it

	nbdSrv    *nbd.Server
	nbdCancel context.CancelFunc
	nbdDone   chan struct{}

	ring ringState

	idleStop context.CancelFunc // stops the idle trimmer (idle.go)
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
		ac, err := w.adopt.AcceptUnix()
		if err != nil {
			w.logger.Error("worker: adopt socket", "err", err)
			w.shutdown()
			return 1
		}
		c = ac
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
		f, err := ListenerFile(w.nbdLn)
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

// describe says what the worker serves, for a daemon adopting it.
func (w *worker) describe() Reply {
	transport, ring := w.ring.running()
	return Reply{OK: true, Describe: &Describe{
		Pid: os.Getpid(), Name: w.name, Format: w.format, Path: w.path,
		ReadOnly: w.readOnly, Size: w.size, Paused: w.paused,
		Open: w.img != nil, NBD: w.nbdSrv != nil, Ring: ring, Transport: transport, URing: w.uring,
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
	case OpWatchRing:
		return w.watchRing(fds)
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
		// Consumers held in the gate must return before they can stop:
		// they end with ErrClosed, and nothing is left to flush.
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
