package reconciler

import (
	"testing"
	"time"
)

// How long a restart waits: Plan's backoff rules, each with a case that
// fails without it. A worker's delays are 0.5 s, then half as long again
// at each crash that came at once, up to 60 s; a local frontend's start at
// 1 s.
func TestPlanRestartDelays(t *testing.T) {
	const ms = second / 1000
	dom0 := obsWith(planDom0, func(o *Observed) { o.Backend, o.Frontend = StateConnected, StateConnected })
	guest := obsWith(planGuest, func(o *Observed) { o.Backend, o.Frontend, o.RingPublished = StateClosed, StateClosed, true })
	exited := func(b Backoff) Actual { return Actual{Exited: "signal: killed", WorkerBackoff: b} }
	ringLost := func(b Backoff) Actual { return Actual{Worker: true, RingLost: "rsp_prod ran ahead", RingBackoff: b} }
	for _, tc := range []struct {
		name string
		o    Observed
		a    Actual
		want ActionKind
		wait Nanos
	}{
		{"first crash: 0.5 s", dom0, exited(Backoff{Served: 100 * ms}), ActAwaitRestart, 500 * ms},
		{"first crash, its delay gone by: restart, having waited 0.5 s", dom0, exited(Backoff{Served: 100 * ms, Since: 600 * ms}),
			ActRestartWorker, 500 * ms},
		{"the restarted worker crashed at once: half as long again", dom0, exited(Backoff{Served: 100 * ms, LastWait: 500 * ms, Since: 100 * ms}),
			ActAwaitRestart, 650 * ms},
		{"... and again", dom0, exited(Backoff{Served: 100 * ms, LastWait: 750 * ms, Since: 1200 * ms}),
			ActRestartWorker, 1125 * ms},
		{"it served ten times its delay: afresh (servedFactor)", dom0, exited(Backoff{Served: 5100 * ms, LastWait: 500 * ms, Since: 500 * ms}),
			ActRestartWorker, 500 * ms},
		{"nine times its delay: still growing", dom0, exited(Backoff{Served: 4500 * ms, LastWait: 500 * ms, Since: 500 * ms}),
			ActAwaitRestart, 250 * ms},
		{"it served a minute: afresh, whatever its delay (stableAfter)", dom0, exited(Backoff{Served: 61 * second, LastWait: 40 * second, Since: 500 * ms}),
			ActRestartWorker, 500 * ms},
		{"the delay stops growing at 60 s", dom0, exited(Backoff{Served: ms, LastWait: 50 * second, Since: 60 * second}),
			ActRestartWorker, 60 * second},
		{"a ring lost for the first time: 1 s", guest, ringLost(Backoff{Served: 1 << 62}), ActAwaitFrontendRestart, second},
		{"a ring lost again at once: 1.5 s", guest, ringLost(Backoff{Served: 2 * second, LastWait: second, Since: second}),
			ActAwaitFrontendRestart, 500 * ms},
		{"... its delay gone by", guest, ringLost(Backoff{Served: 2 * second, LastWait: second, Since: 1500 * ms}),
			ActFrontendRestart, 1500 * ms},
		// Unlike a worker's, a local frontend's restart starts afresh
		// only once it served stableAfter.
		{"a ring that served ten times its delay, under a minute: still growing", guest, ringLost(Backoff{Served: 20 * second, LastWait: second, Since: second}),
			ActAwaitFrontendRestart, 500 * ms},
		{"a ring that served a minute: afresh", guest, ringLost(Backoff{Served: 61 * second, LastWait: 8 * second, Since: second}),
			ActFrontendRestart, second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			acts := Plan(tc.o, tc.a)
			if len(acts) != 1 || acts[0].Kind != tc.want || acts[0].Wait != tc.wait {
				t.Fatalf("Plan = %+v, want one %v with Wait %v", acts, tc.want, time.Duration(tc.wait))
			}
		})
	}
}

// TestPlanStrayRing: an adopted worker that still serves a local ring
// lets go of it before anything else, unless it stops anyway.
func TestPlanStrayRing(t *testing.T) {
	guest := obsWith(planGuest, func(o *Observed) {
		o.Backend, o.Frontend, o.RingPublished = StateConnected, StateConnected, true
	})
	stray := Actual{Worker: true, StrayRing: true}
	runPlanCases(t, []planCase{
		{"adopted worker with a local ring: it lets go first", guest, stray, []ActionKind{ActDisconnectStrayRing}},
		{"... after the adoption is checked", guest, actWith(stray, func(a *Actual) { a.Adopted = AdoptionMatches }),
			[]ActionKind{ActAdoptWorker}},
		{"... unless the worker is stale: it stops", guest, actWith(stray, func(a *Actual) { a.Adopted = AdoptionStale }),
			[]ActionKind{ActStopWorker}},
		{"let go: the guest's handshake starts over", guest, actWith(stray, func(a *Actual) { a.StrayRing = false }),
			[]ActionKind{ActResetOrphanRing}},
	})
}
