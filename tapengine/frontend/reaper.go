package frontend

import (
	"fmt"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/ring"
)

// Collecting responses. Whoever collects (the reaper, or a caller of
// Poll) takes each response off the ring under mu, revokes its pages and
// then, with mu released, completes it: a blocking call's status goes on
// its tag's done channel (room for one, so the send never blocks); a
// started request's Completer is called and its tag given back (unless
// lent). Each Completer that got any then hears CompleteBatch once.

// reaper collects every response until the frontend closes. It sleeps
// reading the notify eventfd (which also consumes the signal); a signal
// sent after the final check in collectLocked wakes it.
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
	sinks []Completer // the Completers that got a call in this batch
}

// reapings recycles Poll's scratch, so polling allocates nothing.
var reapings = sync.Pool{New: func() any { return new(reaping) }}

// reaped is one response taken off the ring.
type reaped struct {
	id uint16
	st int16
}

// reapOnce collects every published response and completes it. It
// reports whether the frontend is closed (or just failed), so the caller
// stops.
func (f *Frontend) reapOnce(r *reaping) (stop bool) {
	f.mu.Lock()
	closed := f.closed
	var err error
	r.batch = r.batch[:0]
	if !closed {
		r.batch, err = f.collectLocked(r.batch)
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
			t.done <- d.st
			continue
		}
		r.sinks = addSink(r.sinks, t.cb)
		f.completeStarted(d)
	}
	for _, cb := range r.sinks {
		cb.CompleteBatch()
	}
	return closed || err != nil
}

// completeStarted hands a started request's response to its Completer
// and gives its tag back, unless a TakeTag caller holds it.
func (f *Frontend) completeStarted(d reaped) {
	t := &f.tags[d.id]
	cb, cookie, lent := t.cb, t.cookie, t.lent
	var data []byte
	err := statusErr(d.st, t.op)
	if err == nil && t.op == blkif.OpRead {
		data = t.mem[:t.n]
	}
	t.cb = nil
	cb.Complete(cookie, data, err)
	if !lent {
		f.release(d.id)
	}
}

// addSink adds cb to the Completers owed a CompleteBatch call, once.
func addSink(sinks []Completer, cb Completer) []Completer {
	if slices.Contains(sinks, cb) {
		return sinks
	}
	return append(sinks, cb)
}

// collectLocked appends every published response to batch, with the
// final check, revoking each one's pages. A response the ring could not
// have carried fails the lot with ring.ErrHostile (the responses before
// it are still returned). Caller holds f.mu.
func (f *Frontend) collectLocked(batch []reaped) ([]reaped, error) {
	var rsp blkif.Response
	for {
		n, err := f.front.Pending()
		if err != nil {
			return batch, err
		}
		for range n {
			f.front.Next(&rsp)
			if rsp.ID >= uint64(len(f.tags)) || !f.tags[rsp.ID].busy {
				return batch, fmt.Errorf("%w: response for id %d, which is not in flight", ring.ErrHostile, rsp.ID)
			}
			t := &f.tags[rsp.ID]
			t.busy = false
			for i := range t.nPages {
				_ = f.gt.Revoke(t.first + uint32(i))
			}
			for i := range t.nIndPgs {
				_ = f.gt.Revoke(t.ind + uint32(i))
			}
			batch = append(batch, reaped{uint16(rsp.ID), rsp.Status})
		}
		more, err := f.front.FinalCheck()
		if err != nil || !more {
			return batch, err
		}
	}
}

// Poll publishes the requests started so far (as Publish does), then
// waits up to spin, busy, for responses and completes them on the
// calling goroutine (as the reaper would), reporting whether it found
// any. A caller with one request in flight and nothing else to do (queue
// depth 1) saves the reaper's wake-up from its latency: the backend
// answers a cached read in a few microseconds, less than a sleep and a
// wake cost.
//
// Before it publishes, the ring asks the backend for no notification
// (Quiet): the answer often comes before the kick's system call returns,
// and its signal would only cost the backend a write and wake the reaper
// for a response the poller takes. Poll ends, found or not, with a
// collection whose final check asks again, so the reaper hears of
// whatever is left.
func (f *Frontend) Poll(spin time.Duration) bool {
	if _, _, err := f.enter(); err != nil {
		return false
	}
	defer f.leave()
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return false
	}
	f.front.Quiet()
	if !f.held {
		f.mu.Unlock()
	} else if err := f.publishLocked(); err != nil {
		f.log.Debug("frontend: kicking the backend", "err", err)
	}
	found := f.spin(spin)
	r := reapings.Get().(*reaping)
	f.reapOnce(r)
	clear(r.sinks)
	reapings.Put(r)
	return found
}

// spin waits up to d for a published response, and reports whether one
// came. It does not yield (runtime.Gosched) while the runtime has other
// Ps: each yield woke a spare thread to look for work, which found none
// and slept again (about one context switch per polled request; yielding
// every 64 looks instead still cost 1.8-2.2 futex calls per request
// against 0.6-0.7). With a single P it yields at every look, as before,
// so that other goroutines (other disks' readers) do not wait out d.
func (f *Frontend) spin(d time.Duration) bool {
	deadline := time.Now().Add(d)
	yield := runtime.GOMAXPROCS(0) == 1
	for i := 0; ; i++ {
		f.mu.Lock()
		n, err := f.front.Pending()
		f.mu.Unlock()
		if err != nil {
			return false // reapOnce fails the ring
		}
		if n > 0 {
			return true
		}
		// The clock costs more than a look at the ring.
		if i%64 == 63 && time.Now().After(deadline) {
			return false
		}
		if yield {
			runtime.Gosched()
		}
	}
}

// failStarted completes every started request still in flight with the
// close error; the frontend is closed, so none of them is answered later
// and their tags are never reused.
func (f *Frontend) failStarted() {
	type started struct {
		cb     Completer
		cookie uint64
	}
	var fail []started
	f.mu.Lock()
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
	var sinks []Completer
	for _, s := range fail {
		s.cb.Complete(s.cookie, nil, err)
		sinks = addSink(sinks, s.cb)
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
