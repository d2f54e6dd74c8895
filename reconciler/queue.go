package reconciler

import (
	"sync"
	"time"
)

// queue holds device keys, never events (docs/ARCHITECTURE.md, section "Level-triggered reconcile"): a key enqueued many
// times before it is taken is reconciled once, a key enqueued while it is
// being reconciled is reconciled once more afterwards, and no key is ever
// reconciled by two goroutines at once.
//
// Keys come in two lanes: Add's, taken first, and AddLow's (the periodic
// resync's), taken only when Add's lane is empty. A resync enqueues every
// device; in one lane, the next step of each device still converging
// waited behind all of them, and a resync every few seconds of a
// convergence whose length grows with the number of disks made it
// quadratic (docs/PERFORMANCE.md, "Convergence").
type queue struct {
	mu      sync.Mutex
	cond    *sync.Cond
	order   []Key
	later   []Key        // AddLow's lane; keys no longer in low are stale
	low     map[Key]bool // pending keys whose turn is in later
	pending map[Key]bool // in order or later, not yet taken
	active  map[Key]bool // being reconciled
	again   map[Key]bool // enqueued while active
	closed  bool
	idlers  []chan struct{} // closed when nothing is pending or active
	gets    uint64          // keys taken so far
}

func newQueue() *queue {
	q := &queue{pending: map[Key]bool{}, low: map[Key]bool{}, active: map[Key]bool{}, again: map[Key]bool{}}
	q.cond = sync.NewCond(&q.mu)
	return q
}

// Add schedules a reconcile of k.
func (q *queue) Add(k Key) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return
	}
	if q.active[k] {
		q.again[k] = true
		return
	}
	if q.pending[k] && !q.low[k] {
		return
	}
	delete(q.low, k) // its entry in later goes stale
	q.pending[k] = true
	q.order = append(q.order, k)
	q.cond.Signal()
}

// AddLow schedules a reconcile of k once no Add's key waits. A key being
// reconciled is left alone: its pass observes afresh anyway.
func (q *queue) AddLow(k Key) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed || q.active[k] || q.pending[k] {
		return
	}
	q.pending[k], q.low[k] = true, true
	q.later = append(q.later, k)
	q.cond.Signal()
}

// AddAfter schedules a reconcile of k after d (a retry with backoff).
func (q *queue) AddAfter(k Key, d time.Duration) {
	time.AfterFunc(d, func() { q.Add(k) })
}

// Get waits for a key; ok is false once the queue is closed.
func (q *queue) Get() (k Key, ok bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for {
		for len(q.order) == 0 && len(q.later) == 0 && !q.closed {
			q.cond.Wait()
		}
		if q.closed {
			return Key{}, false
		}
		if len(q.order) > 0 {
			k, q.order = q.order[0], q.order[1:]
			break
		}
		k, q.later = q.later[0], q.later[1:]
		if q.low[k] {
			delete(q.low, k)
			break
		}
	}
	delete(q.pending, k)
	q.active[k] = true
	q.gets++
	return k, true
}

// Done marks k's reconcile finished, requeueing it if it was added meanwhile.
func (q *queue) Done(k Key) {
	q.mu.Lock()
	defer q.mu.Unlock()
	delete(q.active, k)
	if q.again[k] {
		delete(q.again, k)
		if !q.closed && !q.pending[k] {
			q.pending[k] = true
			q.order = append(q.order, k)
			q.cond.Signal()
		}
	}
	q.wakeIdlersLocked()
}

// Idle returns a channel closed once no key is pending or being
// reconciled (at once, if that is so now).
func (q *queue) Idle() <-chan struct{} {
	q.mu.Lock()
	defer q.mu.Unlock()
	ch := make(chan struct{})
	q.idlers = append(q.idlers, ch)
	q.wakeIdlersLocked()
	return ch
}

// quiet reports whether the queue is idle now, and how many keys were
// ever taken: two equal counts around an interval with quiet at both ends
// mean no reconcile ran in between.
func (q *queue) quiet() (idle bool, gets uint64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.pending) == 0 && len(q.active) == 0, q.gets
}

func (q *queue) wakeIdlersLocked() {
	if len(q.pending) > 0 || len(q.active) > 0 {
		return
	}
	for _, ch := range q.idlers {
		close(ch)
	}
	q.idlers = nil
}

// Close wakes every Get with ok false.
func (q *queue) Close() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	q.cond.Broadcast()
}
