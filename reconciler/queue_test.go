package reconciler

import (
	"testing"
	"time"
)

var qa, qb, qc = Key{KindVBD3, 1, 1}, Key{KindVBD3, 1, 2}, Key{KindVBD3, 2, 1}

// mustGet takes the next key, failing the test if none comes.
func mustGet(t *testing.T, q *queue) Key {
	t.Helper()
	got := make(chan Key, 1)
	go func() {
		if k, ok := q.Get(); ok {
			got <- k
		}
	}()
	select {
	case k := <-got:
		return k
	case <-time.After(10 * time.Second):
		t.Fatal("Get returned nothing")
		return Key{}
	}
}

// pendingKeys is what a Get would return next, in order.
func pendingKeys(q *queue) []Key {
	q.mu.Lock()
	defer q.mu.Unlock()
	return append([]Key(nil), q.order...)
}

func isIdle(q *queue) bool {
	select {
	case <-q.Idle():
		return true
	default:
		return false
	}
}

// Keys, not events: a key added many times before it is taken is
// reconciled once, and distinct keys come out in the order they went in.
func TestQueueDedupAndOrder(t *testing.T) {
	q := newQueue()
	for _, k := range []Key{qa, qb, qa, qc, qb, qa} {
		q.Add(k)
	}
	if got := pendingKeys(q); len(got) != 3 || got[0] != qa || got[1] != qb || got[2] != qc {
		t.Fatalf("pending %v, want [%v %v %v]", got, qa, qb, qc)
	}
	for _, want := range []Key{qa, qb, qc} {
		if k := mustGet(t, q); k != want {
			t.Fatalf("Get = %v, want %v", k, want)
		}
	}
	if got := pendingKeys(q); len(got) != 0 {
		t.Fatalf("after taking every key, %v still pending", got)
	}
}

// A key added while it is being reconciled is not handed to a second
// goroutine: it waits for Done, then comes back once.
func TestQueueAddWhileActive(t *testing.T) {
	q := newQueue()
	q.Add(qa)
	if k := mustGet(t, q); k != qa {
		t.Fatalf("Get = %v", k)
	}
	q.Add(qa)
	q.Add(qa)
	q.Add(qb)
	if got := pendingKeys(q); len(got) != 1 || got[0] != qb {
		t.Fatalf("pending while %v is active: %v, want only %v", qa, got, qb)
	}
	q.Done(qa)
	if got := pendingKeys(q); len(got) != 2 || got[0] != qb || got[1] != qa {
		t.Fatalf("pending after Done: %v, want [%v %v]", got, qb, qa)
	}
	mustGet(t, q)
	mustGet(t, q)
	q.Done(qa)
	q.Done(qb)
	if got := pendingKeys(q); len(got) != 0 {
		t.Fatalf("a key added once while active came back twice: %v", got)
	}
}

// Idle: closed at once on an idle queue, held while a key is pending or
// active, closed once the last reconcile is done; quiet counts takes.
func TestQueueIdle(t *testing.T) {
	q := newQueue()
	if !isIdle(q) {
		t.Fatal("a new queue is not idle")
	}
	q.Add(qa)
	idle := q.Idle()
	if isIdle(q) {
		t.Fatal("idle with a key pending")
	}
	mustGet(t, q)
	if isIdle(q) {
		t.Fatal("idle while a key is being reconciled")
	}
	if quiet, gets := q.quiet(); quiet || gets != 1 {
		t.Fatalf("quiet() = %v, %d with a key active; want false, 1", quiet, gets)
	}
	q.Add(qa) // again, while active: Done must not count as idle
	q.Done(qa)
	select {
	case <-idle:
		t.Fatal("idle while a key added during its reconcile is pending")
	default:
	}
	mustGet(t, q)
	q.Done(qa)
	select {
	case <-idle:
	case <-time.After(10 * time.Second):
		t.Fatal("Idle never closed after the last Done")
	}
	if quiet, gets := q.quiet(); !quiet || gets != 2 {
		t.Fatalf("quiet() = %v, %d; want true, 2", quiet, gets)
	}
}

// AddAfter schedules, it does not add: the key is not pending before the
// delay and is after it. (The queue reads the real clock; a fake one
// would let this test run without waiting.)
func TestQueueAddAfter(t *testing.T) {
	q := newQueue()
	const delay = 200 * time.Millisecond
	start := time.Now()
	q.AddAfter(qa, delay)
	if got := pendingKeys(q); len(got) != 0 && time.Since(start) < delay {
		t.Fatalf("pending right after AddAfter: %v", got)
	}
	if k := mustGet(t, q); k != qa {
		t.Fatalf("Get = %v", k)
	}
	if took := time.Since(start); took < delay {
		t.Fatalf("the key came back after %v, before its %v delay", took, delay)
	}
	// A retry for a key that is already pending does not add a second
	// reconcile: once a later retry of another key is in, the first has
	// fired too.
	q.Done(qa)
	q.Add(qa)
	q.AddAfter(qa, time.Millisecond)
	q.AddAfter(qb, 50*time.Millisecond)
	for deadline := time.Now().Add(10 * time.Second); len(pendingKeys(q)) < 2; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the retries never came: pending %v", pendingKeys(q))
		}
	}
	if got := pendingKeys(q); len(got) != 2 || got[0] != qa || got[1] != qb {
		t.Fatalf("pending %v, want [%v %v]", got, qa, qb)
	}
}

// Close wakes a waiting Get with ok false, and a closed queue takes no
// more keys, not even one that was active.
func TestQueueClose(t *testing.T) {
	q := newQueue()
	q.Add(qa)
	mustGet(t, q)
	woken := make(chan bool, 1)
	go func() {
		_, ok := q.Get()
		woken <- ok
	}()
	q.Add(qa) // active: comes back on Done unless the queue closed
	// Let the Get reach its wait, so Close has someone to wake. (Should
	// it not get there in time, the test checks less, never fails.)
	time.Sleep(100 * time.Millisecond)
	q.Close()
	select {
	case ok := <-woken:
		if ok {
			t.Fatal("Get returned a key after Close")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not wake a waiting Get")
	}
	q.Done(qa)
	q.Add(qb)
	if got := pendingKeys(q); len(got) != 0 {
		t.Fatalf("a closed queue took %v", got)
	}
	if _, ok := q.Get(); ok {
		t.Fatal("Get on a closed queue returned a key")
	}
}

// TestQueueLowLane: the resync's keys wait for every Add's key, an Add of
// a key waiting in the low lane moves it ahead and it is taken once, a key
// being reconciled ignores AddLow, and the queue is idle only once the
// low lane is empty too.
func TestQueueLowLane(t *testing.T) {
	q := newQueue()
	q.AddLow(qa)
	q.AddLow(qb)
	q.AddLow(qa) // already waiting: once
	q.Add(qc)
	q.Add(qb) // promoted out of the low lane
	for i, want := range []Key{qc, qb, qa} {
		if isIdle(q) {
			t.Fatalf("idle with %v still waiting", want)
		}
		got := mustGet(t, q)
		if got != want {
			t.Fatalf("take %d: got %v, want %v", i, got, want)
		}
		if got == qa {
			q.AddLow(qa) // being reconciled: nothing to add
		}
		q.Done(got)
	}
	if !isIdle(q) {
		t.Fatalf("not idle after every key was taken; stale low-lane entries counted: %v", q.later)
	}
	q.AddLow(qb)
	if got := mustGet(t, q); got != qb {
		t.Fatalf("got %v, want %v", got, qb)
	}
	q.Done(qb)
	if !isIdle(q) {
		t.Fatal("not idle")
	}
}
