package worker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// A ring stops on its own only on a fault (a hostile or broken frontend),
// and the daemon must then close the device. Asking every worker for its
// stats every few seconds to learn of it woke every idle guest disk's
// worker; instead the daemon passes a pipe (OpWatchRing) and the worker
// writes the fault to it when it happens, so the daemon's reader sleeps
// until there is something to say. The pipe is written without blocking:
// a report that does not fit (the daemon stopped reading) is dropped, and
// the daemon still has the fault from stats.

// maxWatchReport bounds one report to what a pipe writes atomically.
const maxWatchReport = 512

// watchRing keeps fds[0] as the ring fault pipe, replacing any earlier one.
func (w *worker) watchRing(fds []int) Reply {
	if len(fds) != 1 {
		closeAll(fds)
		return fail(fmt.Errorf("%w: watch-ring wants 1 descriptor, got %d", errInvalid, len(fds)))
	}
	if err := unix.SetNonblock(fds[0], true); err != nil {
		closeAll(fds)
		return fail(err)
	}
	f := os.NewFile(uintptr(fds[0]), "ring-watch")
	w.ring.mu.Lock()
	old := w.ring.watch
	w.ring.watch = f
	w.ring.mu.Unlock()
	if old != nil {
		old.Close()
	}
	return Reply{OK: true}
}

// report writes a ring fault to the watch pipe, if any. Called with r.mu held.
func (r *ringState) report(err error) {
	if r.watch == nil {
		return
	}
	msg := err.Error()
	if len(msg) > maxWatchReport-1 {
		msg = msg[:maxWatchReport-1]
	}
	r.watch.Write([]byte(msg + "\n")) // best effort: see above
}

// RingWatch is the daemon's end of a worker's ring fault pipe.
type RingWatch struct {
	mu      sync.Mutex
	pending string // the last fault reported and not yet taken
}

// ErrWatchUnsupported: the worker predates OpWatchRing (an adopted worker
// of an older version); the daemon must poll stats instead.
var ErrWatchUnsupported = errors.New("worker cannot report ring faults")

// WatchRing asks the worker to report its rings' faults as they happen:
// onFault runs (on another goroutine) after each report, which Take then
// returns. ErrWatchUnsupported: poll Stats' RingError instead. The watch
// ends by itself when the worker exits.
func (p *Process) WatchRing(ctx context.Context, onFault func()) (*RingWatch, error) {
	r, wr, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	_, err = p.Call(ctx, Request{Op: OpWatchRing}, int(wr.Fd()))
	wr.Close() // the worker holds its own copy now
	if err != nil {
		r.Close()
		var we *Error
		if errors.As(err, &we) && strings.Contains(we.Msg, "unknown op") {
			return nil, ErrWatchUnsupported
		}
		return nil, err
	}
	rw := &RingWatch{}
	go rw.read(r, onFault)
	return rw, nil
}

func (rw *RingWatch) read(r *os.File, onFault func()) {
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, maxWatchReport), maxWatchReport)
	for sc.Scan() {
		rw.mu.Lock()
		rw.pending = sc.Text()
		rw.mu.Unlock()
		onFault()
	}
}

// Take returns the last fault reported since the last Take, or "".
func (rw *RingWatch) Take() string {
	rw.mu.Lock()
	defer rw.mu.Unlock()
	msg := rw.pending
	rw.pending = ""
	return msg
}
