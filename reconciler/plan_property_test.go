package reconciler

import (
	"flag"
	"fmt"
	"math/rand"
	"strings"
	"testing"
)

var (
	planSeed   = flag.Int64("plan.seed", 1, "first seed of the Plan property tests (0: from the clock)")
	planStates = flag.Int("plan.states", 3000, "random reachable states the Plan property tests try")
)

// planStepLimit bounds convergence: the longest handshake (a libxl guest
// disk from Initialising to Connected, or a torn-down one restarting) is
// well under it, as for Model.Converge.
const planStepLimit = 24

// envEvent is something outside the daemon does to a device: the
// toolstack, the frontend, the worker or the image. when says whether it
// can happen in the model's state.
type envEvent struct {
	name string
	when func(m *Model) bool
	do   func(m *Model)
}

// guestFrontend: a real guest's blkfront drives the frontend half, not
// the daemon.
func guestFrontend(m *Model) bool { return !m.o.Domain0 && !m.o.LocalFrontend }

var envEvents = []envEvent{
	{"detach", func(m *Model) bool { return m.o.Present && m.o.Online },
		func(m *Model) { m.o.Online, m.o.Backend = false, StateClosing }},
	{"remove", func(m *Model) bool { return m.o.Present }, func(m *Model) { m.o = Observed{} }},
	{"worker-dies", func(m *Model) bool { return m.a.Worker },
		func(m *Model) { workerDies(m, 0) }},
	{"worker-dies-after-serving", func(m *Model) bool { return m.a.Worker },
		func(m *Model) { workerDies(m, 2*stableAfter) }},
	{"restart-backoff-elapsed", func(m *Model) bool {
		return m.a.Exited != "" && m.a.WorkerBackoff.Since < workerRestart.delay(m.a.WorkerBackoff)
	}, func(m *Model) { m.a.WorkerBackoff.Since = workerRestart.delay(m.a.WorkerBackoff) }},
	{"ring-backoff-elapsed", func(m *Model) bool {
		return m.a.RingLost != "" && m.a.RingBackoff.Since < ringRestart.delay(m.a.RingBackoff)
	}, func(m *Model) { m.a.RingBackoff.Since = ringRestart.delay(m.a.RingBackoff) }},
	// A new daemon adopts the worker; the local frontend, which lived in
	// the old one, is gone, and with it the ring it drove.
	{"daemon-restarts", func(m *Model) bool { return m.a.Worker }, func(m *Model) { daemonRestarts(m, AdoptionMatches) }},
	{"daemon-restarts-declaration-changed", func(m *Model) bool { return m.a.Worker },
		func(m *Model) { daemonRestarts(m, AdoptionStale) }},
	{"qos-changed", func(m *Model) bool { return m.o.Present },
		func(m *Model) { m.o.QoS = QoS{IOPS: 100 - m.o.QoS.IOPS} }},
	{"nbd-device-toggled", func(m *Model) bool { return m.o.Present && m.o.Domain0 },
		func(m *Model) { m.o.KernelNBD = !m.o.KernelNBD }},
	{"request-pause", func(m *Model) bool { return m.o.Request == RequestNone }, func(m *Model) { m.o.Request = RequestPause }},
	{"request-resume", func(m *Model) bool { return m.o.Request == RequestNone }, func(m *Model) { m.o.Request = RequestResume }},
	{"request-snapshot", func(m *Model) bool { return m.o.Request == RequestNone }, func(m *Model) { m.o.Request = RequestSnapshot }},
	{"ring-hostile", func(m *Model) bool { return m.a.Ring },
		func(m *Model) { m.a.Ring, m.a.RingError = false, "hostile" }},
	{"frontend-gives-up", func(m *Model) bool { return m.a.Ring && m.o.LocalFrontend },
		func(m *Model) { m.a.RingError = "rsp_prod ran ahead" }},
	{"fail-start", func(m *Model) bool { return !m.a.Worker }, func(m *Model) { m.failStart = "no such image" }},
	{"hotplug-connected", func(m *Model) bool { return m.o.HotplugScript && m.o.Backend == StateInitWait },
		func(m *Model) { m.o.HotplugConnected = true }},
	{"ring-published", func(m *Model) bool {
		return guestFrontend(m) && m.o.Backend == StateInitWait && m.o.FrontendPresent
	}, func(m *Model) { m.o.Frontend, m.o.RingPublished = StateInitialised, true }},
	{"frontend-connected", func(m *Model) bool { return guestFrontend(m) && m.o.Backend == StateConnected },
		func(m *Model) { m.o.Frontend = StateConnected }},
	{"frontend-closing", func(m *Model) bool { return guestFrontend(m) && m.o.FrontendPresent },
		func(m *Model) { m.o.Frontend = StateClosing }},
	{"frontend-closed", func(m *Model) bool { return guestFrontend(m) && m.o.Frontend == StateClosing },
		func(m *Model) { m.o.Frontend = StateClosed }},
	{"frontend-reconnects", func(m *Model) bool { return guestFrontend(m) && m.o.Frontend == StateClosed },
		func(m *Model) { m.o.Frontend, m.o.RingPublished, m.o.FrontendError = StateInitialising, false, "" }},
	{"frontend-gone", func(m *Model) bool { return guestFrontend(m) && m.o.FrontendPresent },
		func(m *Model) { m.o.FrontendPresent, m.o.Frontend, m.o.RingPublished = false, StateUnknown, false }},
	{"frontend-error", func(m *Model) bool { return guestFrontend(m) && m.o.RingPublished },
		func(m *Model) { m.o.FrontendError = "bad ring-ref" }},
	{"medium-change", func(m *Model) bool { return m.o.Cdrom && m.o.Present },
		func(m *Model) { m.o.Params = fmt.Sprintf("aio:/iso/%d.iso", len(m.o.Params)) }},
}

// workerDies: the worker exits on its own after serving for served.
func workerDies(m *Model, served Nanos) {
	m.a.Worker, m.a.Export, m.a.Ring, m.a.Paused, m.a.QoS = false, false, false, false, QoS{}
	m.a.Exited, m.a.Adopted, m.a.StrayRing = "killed", AdoptionNone, false
	m.a.WorkerBackoff.Served, m.a.WorkerBackoff.Since = served, 0
}

// daemonRestarts: the daemon restarts and adopts the running worker,
// whose check against xenstore comes out as adopted says.
func daemonRestarts(m *Model, adopted Adoption) {
	if m.o.LocalFrontend {
		// The worker still serves the ring, which nobody drives.
		m.a.Ring, m.a.StrayRing = false, m.a.Ring || m.a.StrayRing
	}
	m.a.LF, m.a.LFConnected, m.a.KernelNBD, m.a.QoS, m.a.Paused = false, false, false, QoS{}, false
	m.a.RingError, m.a.RingLost, m.a.Params, m.a.Adopted = "", "", "", adopted
}

// randomReachable builds a device state the daemon can meet: a device
// declared the way one of the toolstacks declares it, then a random walk
// that interleaves Plan's own steps with events from outside. Everything
// a state can be made of is chosen here, so a new input to Plan needs a
// change in this function only.
func randomReachable(r *rand.Rand) (*Model, []string) {
	domain0 := r.Intn(4) == 0
	m := NewModel(domain0, !domain0 && r.Intn(2) == 0)
	m.o.Params, m.o.Mode = "aio:/img", "w"
	m.o.HotplugScript = !m.o.LocalFrontend && !domain0 && r.Intn(2) == 0
	m.o.Declared = r.Intn(3) == 0
	m.o.Cdrom = r.Intn(5) == 0
	m.o.KernelNBD = domain0 && r.Intn(3) == 0
	if r.Intn(3) == 0 {
		m.o.QoS = QoS{IOPS: 100, Bandwidth: 1 << 20}
	}
	trace := []string{"start " + m.state() + fmt.Sprintf(" (script %v, declared %v, cdrom %v)",
		m.o.HotplugScript, m.o.Declared, m.o.Cdrom)}
	for range r.Intn(40) {
		if r.Intn(3) > 0 {
			// The daemon's turn: one step of the current plan.
			if acts := Plan(m.o, m.a); len(acts) > 0 {
				a := acts[r.Intn(len(acts))]
				if r.Intn(2) == 0 {
					a = acts[0]
				}
				m.apply(a)
				trace = append(trace, "> "+a.String())
				continue
			}
		}
		var possible []envEvent
		for _, e := range envEvents {
			if e.when(m) {
				possible = append(possible, e)
			}
		}
		if len(possible) == 0 {
			continue
		}
		e := possible[r.Intn(len(possible))]
		e.do(m)
		trace = append(trace, e.name)
	}
	return m, append(trace, "= "+m.state())
}

// TestPlanConverges: from any reachable state, applying Plan's actions
// reaches a state where Plan asks for nothing, within planStepLimit
// rounds: no oscillation, no action that never takes effect.
func TestPlanConverges(t *testing.T) {
	seed := *planSeed
	if seed == 0 {
		seed = rand.Int63()
	}
	r := rand.New(rand.NewSource(seed))
	finals := map[string]bool{}
	seen := map[ActionKind]bool{}
	for i := range *planStates {
		m, trace := randomReachable(r)
		for _, line := range trace {
			if k, ok := planned(line); ok {
				seen[k] = true
			}
		}
		converged := false
		for range planStepLimit {
			acts := Plan(m.o, m.a)
			if len(acts) == 0 {
				converged = true
				break
			}
			var kinds []string
			for _, a := range acts {
				m.apply(a)
				kinds = append(kinds, a.Kind.String())
				seen[a.Kind] = true
			}
			trace = append(trace, "plan: "+strings.Join(kinds, ", ")+" = "+m.state())
		}
		if !converged {
			t.Fatalf("state %d of seed %d (-plan.seed=%d) does not converge in %d rounds:\n%s",
				i, seed, seed, planStepLimit, strings.Join(trace, "\n"))
		}
		if bad := badFixedPoint(m); bad != "" {
			t.Fatalf("state %d of seed %d (-plan.seed=%d) settles where %s:\n%s",
				i, seed, seed, bad, strings.Join(trace, "\n"))
		}
		finals[m.state()] = true
	}
	// A generator that only ever builds one kind of state proves little.
	if len(finals) < 10 {
		t.Fatalf("seed %d: only %d distinct fixed points reached: %v", seed, len(finals), finals)
	}
	// Nor does one that never reaches a rule: every action is planned
	// from some state, and shown to converge from there.
	for k, name := range actionNames {
		if !seen[k] && *planStates >= 3000 {
			t.Errorf("seed %d: no reachable state plans %s", seed, name)
		}
	}
}

// planned is the action a trace line of randomReachable says was applied.
func planned(line string) (ActionKind, bool) {
	rest, ok := strings.CutPrefix(line, "> ")
	if !ok {
		return 0, false
	}
	name, _, _ := strings.Cut(rest, ":")
	for k, n := range actionNames {
		if n == name {
			return k, true
		}
	}
	return 0, false
}

// badFixedPoint says what is wrong with a state Plan leaves as it is.
func badFixedPoint(m *Model) string {
	o, a := m.o, m.a
	switch {
	case o.Request != RequestNone:
		return "an operator's request is never answered"
	case a.Adopted != AdoptionNone:
		return "an adopted worker is never checked"
	case a.Worker && a.QoS != o.QoS:
		return "the worker's limits are not the desired ones"
	case a.KernelNBD && (!a.Worker || !o.Present || o.Backend != StateConnected):
		return "a kernel nbd device stays connected to a disk that is not"
	case o.KernelNBD && !a.KernelNBD && a.Export && o.Backend == StateConnected && o.Domain0:
		return "the kernel nbd device asked for is never connected"
	case a.Paused && !a.Worker:
		return "a paused disk has no worker"
	case orphanRing(o, a):
		return "a guest's ring has no frontend"
	case a.StrayRing && a.Worker:
		return "an adopted worker keeps serving a ring nobody drives"
	}
	return ""
}
