package worker

import (
	"context"
	"runtime"
	"runtime/debug"
	"time"

	"github.com/blktap-go/blktap/tapengine/idle"
)

// IdleTrim is how long a disk must see no I/O after a burst before its
// memory is given back to the system: the worker returns its Go heap's
// free pages (debug.FreeOSMemory), the daemon punches the guest view's
// idle grant pages (frontend.Trim). Zero or less disables trimming. Set it
// before the first disk opens.
//
// Why: under load the runtime grows its heap (NBD payload buffers, ring
// batches) and keeps the pages after the load ends; the background
// scavenger gives them back only slowly and only above the heap goal, so
// an idle disk would keep the RSS of its busiest minute.
var IdleTrim = 5 * time.Second

// Activity reports a disk's I/O as a counter that moves with every
// operation, and whether an operation is in flight now. It is polled (a
// few atomic loads), so the I/O path pays nothing for idle detection.
type Activity func() (ops uint64, busy bool)

// TrimWhenIdle calls trim once each time the disk's activity has moved and
// then stood still for idle, until ctx is done: once after each burst,
// never again until there was I/O again, never while idle from the start.
// It polls activity every idle/4 while a burst may be ending, so trim runs
// between idle and 1.25 x idle after the last operation. In between (idle
// from the start, or trimmed already) it sleeps on bell, which the I/O path
// rings: an idle disk costs no wake-ups. A nil bell polls throughout.
func TrimWhenIdle(ctx context.Context, idleFor time.Duration, activity Activity, bell *idle.Doorbell, trim func()) {
	if idleFor <= 0 {
		return
	}
	ops, _ := activity()
	s := idleState{idle: idleFor, last: ops}
	for {
		if bell != nil && !s.armed && !sleep(ctx, bell, activity, &s) {
			return
		}
		if !s.pollUntilTrim(ctx, activity, trim) {
			return
		}
	}
}

// sleep waits on bell for the first operation after s last looked, and
// reports false once ctx is done. The re-read after Sleep closes the race
// with an operation that rang just before it (package idle).
func sleep(ctx context.Context, bell *idle.Doorbell, activity Activity, s *idleState) bool {
	bell.Sleep()
	if ops, busy := activity(); ops != s.last || busy {
		bell.Awake()
		return true
	}
	select {
	case <-ctx.Done():
		return false
	case <-bell.Wait():
		return true
	}
}

// pollUntilTrim polls activity every idle/4 until the disk has stood still
// for idle after moving (it trims then) or has stood still since the poll
// began; false once ctx is done.
func (s *idleState) pollUntilTrim(ctx context.Context, activity Activity, trim func()) bool {
	tick := time.NewTicker(max(s.idle/4, time.Millisecond))
	defer tick.Stop()
	quiet := 0
	for {
		select {
		case <-ctx.Done():
			return false
		case now := <-tick.C:
			ops, busy := activity()
			if s.observe(now, ops, busy) {
				trim()
				return true
			}
			if !s.armed {
				// Woken with nothing new (a ring that came before
				// the counters moved is seen on the next poll):
				// a few polls, then back to sleep.
				if quiet++; quiet > 4 {
					return true
				}
			}
		}
	}
}

// idleState decides when a disk turned idle after a burst; pure (now is an
// argument), so a table can test it.
type idleState struct {
	idle  time.Duration
	last  uint64    // the activity counter at the last observation
	moved time.Time // when it was last seen moving (or busy)
	armed bool      // there was I/O since the last trim
}

// observe records one poll and says whether to trim now.
func (s *idleState) observe(now time.Time, ops uint64, busy bool) bool {
	if ops != s.last || busy {
		s.last, s.moved, s.armed = ops, now, true
		return false
	}
	if s.armed && now.Sub(s.moved) >= s.idle {
		s.armed = false
		return true
	}
	return false
}

// activity is the meter as an Activity: operations completed (summed over
// every operation's histogram) and whether any is in flight.
func (m *meter) activity() (ops uint64, busy bool) {
	for op := range m.ops {
		for i := range m.ops[op].buckets {
			ops += m.ops[op].buckets[i].Load()
		}
	}
	return ops, m.inFlight.Load() > 0
}

// startIdleTrim runs TrimWhenIdle over the disk's meter, returning the
// Go heap's free memory to the system after each burst; the returned
// function stops it.
func (w *worker) startIdleTrim() context.CancelFunc {
	ctx, cancel := context.WithCancel(context.Background())
	m, log := &w.io.meter, w.logger
	go TrimWhenIdle(ctx, IdleTrim, m.activity, &m.bell, func() {
		ReleaseMemory()
		log.Debug("worker: idle after I/O; heap memory returned to the system")
	})
	return cancel
}

// ReleaseMemory returns the Go heap's free memory to the system. Two
// collections, because the first only moves sync.Pool caches (the NBD
// server's payload buffers) to their victim cache and the second frees
// them; FreeOSMemory, the second, also returns the freed pages at once
// instead of leaving them to the background scavenger. Costly (two full
// collections): call it once after a burst, never per request.
func ReleaseMemory() {
	runtime.GC()
	debug.FreeOSMemory()
}
