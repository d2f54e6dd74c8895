package worker

import (
	"context"
	"sync/atomic"
	"testing"
	"time"
)

// TestIdleState: the decision, step by step with explicit times: trim
// once after a burst has stood still for the idle time, never while idle
// from the start, never while an operation is in flight, and again only
// after new I/O.
func TestIdleState(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	s := idleState{idle: 5 * time.Second, last: 7}
	steps := []struct {
		t    float64
		ops  uint64
		busy bool
		trim bool
		why  string
	}{
		{1, 7, false, false, "idle from the start"},
		{20, 7, false, false, "still idle from the start: nothing to give back"},
		{21, 50, false, false, "a burst"},
		{22, 90, false, false, "still going"},
		{26, 90, false, false, "4 s since the last move"},
		{27, 90, true, false, "an operation in flight counts as I/O"},
		{31, 90, false, false, "4 s since it was last busy"},
		{32, 90, false, true, "5 s idle after the burst: trim"},
		{40, 90, false, false, "once per burst"},
		{100, 90, false, false, "still once"},
		{101, 91, false, false, "one more operation"},
		{106, 91, false, true, "trim again"},
		{200, 91, false, false, "and only once"},
	}
	for _, st := range steps {
		if got := s.observe(at(st.t), st.ops, st.busy); got != st.trim {
			t.Fatalf("t=%v ops=%d busy=%v: trim %v, want %v (%s)", st.t, st.ops, st.busy, got, st.trim, st.why)
		}
	}
}

// TestTrimWhenIdle: the poller over a real meter, with a short interval:
// operations through the meter arm it, one trim follows, and the trimmer
// stops with its context. It waits for events, not for durations: the
// only timing is the trimmer's own interval.
func TestTrimWhenIdle(t *testing.T) {
	const idle = 20 * time.Millisecond
	var m meter
	var trims atomic.Int32
	trimmed := make(chan struct{}, 10)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		TrimWhenIdle(ctx, idle, m.activity, &m.bell, func() { trims.Add(1); trimmed <- struct{}{} })
	}()
	// Idle from the start: many intervals pass without a trim.
	time.Sleep(10 * idle)
	if n := trims.Load(); n != 0 {
		t.Fatalf("%d trims with no I/O at all", n)
	}
	for round := 1; round <= 2; round++ {
		// One operation: a burst with no gap inside it for the
		// trimmer to mistake for idle time on a loaded machine.
		m.end(opWrite, m.start())
		select {
		case <-trimmed:
		case <-time.After(10 * time.Second):
			t.Fatalf("round %d: no trim after the burst", round)
		}
		// No I/O since: no second trim over many intervals.
		time.Sleep(10 * idle)
		if n := trims.Load(); n != int32(round) {
			t.Fatalf("round %d: %d trims, want %d", round, n, round)
		}
	}
	cancel()
	<-done
}

// TestTrimWhenIdleDisabled: IdleTrim <= 0 returns at once.
func TestTrimWhenIdleDisabled(t *testing.T) {
	TrimWhenIdle(context.Background(), 0, func() (uint64, bool) { return 0, false }, nil, func() { t.Fatal("trimmed") })
}

// TestMeterActivity: every operation kind moves the counter; in-flight
// operations make it busy.
func TestMeterActivity(t *testing.T) {
	var m meter
	ops, busy := m.activity()
	if ops != 0 || busy {
		t.Fatalf("fresh meter: %d ops, busy %v", ops, busy)
	}
	for op := range numOps {
		t0 := m.start()
		if _, busy := m.activity(); !busy {
			t.Fatalf("op %s in flight, not busy", opNames[op])
		}
		m.end(op, t0)
	}
	ops, busy = m.activity()
	if ops != numOps || busy {
		t.Fatalf("after %d ops: %d ops, busy %v", numOps, ops, busy)
	}
}

// TestTrimWhenIdleSleeps: with a doorbell, the trimmer does not poll an
// idle disk at all (no wake-ups), neither idle from the start nor after
// the trim that follows a burst; an operation wakes it.
func TestTrimWhenIdleSleeps(t *testing.T) {
	const idle = 20 * time.Millisecond
	var m meter
	var polls atomic.Int64
	activity := func() (uint64, bool) { polls.Add(1); return m.activity() }
	trimmed := make(chan struct{}, 10)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go TrimWhenIdle(ctx, idle, activity, &m.bell, func() { trimmed <- struct{}{} })
	quiet := func(what string) {
		time.Sleep(5 * idle) // let it settle into its sleep
		before := polls.Load()
		time.Sleep(20 * idle)
		if n := polls.Load() - before; n != 0 {
			t.Fatalf("%s: %d polls of an idle disk, want 0", what, n)
		}
	}
	quiet("idle from the start")
	for round := 1; round <= 2; round++ {
		m.end(opRead, m.start())
		select {
		case <-trimmed:
		case <-time.After(10 * time.Second):
			t.Fatalf("round %d: no trim after the burst", round)
		}
		quiet("after the trim")
	}
}
