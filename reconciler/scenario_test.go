package reconciler

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

var rewrite = flag.Bool("rewrite", false, "rewrite the scenario transcripts in testdata/scenarios")

// A scenario drives Plan through a device's life with a model of what each
// action does (the effects apply() has on xenstore and on the worker) and
// events from outside (the toolstack, the frontend, a crash). The
// transcript in testdata/scenarios/NAME.txt holds the commands and, after
// every `converge`, the actions Plan chose ("> ") and the state reached
// ("= "). go test ./reconciler -run Scenario -rewrite regenerates them; a
// behaviour change is then a readable diff.
//
// Commands:
//
//	start domain0|guest|xen-guest   a new device, as a toolstack writes it (both states Initialising)
//	start xen-libxl|xen-attach      a real guest's disk declared by libxl (with a hotplug script) or by `blktap attach`
//	converge                        plan and apply until nothing is left (at most 24 steps)
//	frontend STATE                  the frontend writes its state (a real guest's blkfront)
//	ring-published                  the frontend wrote ring-ref and event-channel
//	detach                          the toolstack: online 0, backend Closing
//	remove                          the toolstack removes the backend directory
//	worker-dies                     the worker process exits
//	ring-hostile MESSAGE            the worker's ring stopped on a hostile frontend
//	frontend-gives-up MESSAGE       the local frontend stopped on a ring the worker broke (its ring stays mapped)
//	fail-start MESSAGE              the next start-worker fails terminally
//	hotplug-connected               the toolstack's hotplug script wrote hotplug-status=connected
//	frontend-gone                   the frontend directory vanished (the guest died without libxl)
//	frontend-error MESSAGE          the frontend published ring keys the backend cannot use
//	cdrom                           the device is a CD-ROM drive (device-type cdrom)
//	params [VALUE]                  the toolstack writes params (none: an empty drive)
//	device N                        later commands are about the Nth device started
//	daemon-restart                  the daemon exits, its workers stay, a new daemon adopts them
//
// The Model has one device per start. TestScenariosDaemon
// (scenario_daemon_test.go) plays the same transcripts against the real
// daemon; its own commands (fault, check, serve) change nothing
// here: a fault the daemon must ride out leaves the Model's outcome.
func runScenario(t *testing.T, lines []string) string {
	var out strings.Builder
	m := &Model{}
	var models []*Model
	for n, line := range lines {
		if strings.HasPrefix(line, "> ") || strings.HasPrefix(line, "= ") {
			continue // output of the previous run
		}
		out.WriteString(line + "\n")
		f := strings.Fields(line)
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		arg := strings.Join(f[1:], " ")
		switch f[0] {
		case "start":
			if m = startModel(arg); m == nil {
				t.Fatalf("line %d: start %q", n+1, arg)
			}
			models = append(models, m)
		case "device":
			i, err := strconv.Atoi(arg)
			if err != nil || i < 1 || i > len(models) {
				t.Fatalf("line %d: no device %q", n+1, arg)
			}
			m = models[i-1]
		case "daemon-restart":
			for _, dm := range models {
				adopted(dm)
			}
		case "fault", "check", "serve":
		case "converge":
			convergeModel(m, &out)
		case "frontend":
			st, ok := frontendStates[arg]
			if !ok {
				t.Fatalf("line %d: frontend %q", n+1, arg)
			}
			m.o.Frontend = st
		case "ring-published":
			m.o.RingPublished = true
		case "detach":
			m.o.Online, m.o.Backend = false, StateClosing
		case "remove":
			m.o = Observed{}
		case "worker-dies":
			m.a.Worker, m.a.Export, m.a.Ring = false, false, false
			m.a.Exited, m.a.WorkerBackoff.Served, m.a.WorkerBackoff.Since = "worker exited", 0, 0
		case "ring-hostile":
			m.a.Ring, m.a.RingError = false, arg
		case "frontend-gives-up":
			m.a.RingError = arg
		case "fail-start":
			m.failStart = arg
		case "hotplug-connected":
			m.o.HotplugConnected = true
		case "frontend-gone":
			m.o.FrontendPresent, m.o.Frontend, m.o.RingPublished = false, StateUnknown, false
		case "frontend-error":
			m.o.FrontendError = arg
		case "cdrom":
			m.o.Cdrom = true
		case "params":
			m.o.Params = arg
		default:
			t.Fatalf("line %d: unknown command %q", n+1, line)
		}
	}
	return out.String()
}

// frontendStates are the states a transcript's frontend command names.
var frontendStates = map[string]State{"Initialising": StateInitialising, "InitWait": StateInitWait,
	"Initialised": StateInitialised, "Connected": StateConnected, "Closing": StateClosing, "Closed": StateClosed}

// startModel is a new device as a toolstack declares it (both states
// Initialising); nil for an unknown kind.
func startModel(kind string) *Model {
	m := &Model{o: Observed{Present: true, Online: true, Params: "aio:/img", Mode: "w",
		Backend: StateInitialising, FrontendPresent: true, Frontend: StateInitialising}}
	// On Xen every device is exported too (physical-device-path).
	m.o.Export = true
	switch kind {
	case "domain0":
		m.o.Domain0 = true
	case "guest":
		m.o.LocalFrontend, m.o.Export = true, false
	case "xen-guest":
	case "xen-libxl":
		m.o.HotplugScript = true
	case "xen-attach":
		m.o.HotplugScript, m.o.Declared = true, true
	default:
		return nil
	}
	return m
}

// convergeModel plans and applies until nothing is left (at most 24
// rounds), writing each action and the state reached.
func convergeModel(m *Model, out *strings.Builder) {
	for steps := 0; ; steps++ {
		m.fold()
		acts := Plan(m.o, m.a)
		if len(acts) == 0 {
			break
		}
		for _, a := range acts {
			if !isAwait(a.Kind) {
				// As the daemon's transcript: a wait is a pass
				// requeued for later, not a step taken.
				fmt.Fprintf(out, "> %s\n", a)
			}
			m.apply(a)
		}
		if steps == 24 {
			out.WriteString("> (does not converge)\n")
			break
		}
	}
	fmt.Fprintf(out, "= %s\n", m.state())
}

func isAwait(k ActionKind) bool { return k == ActAwaitRestart || k == ActAwaitFrontendRestart }

// adopted is what a new daemon holds of a device whose worker the old one
// left running (adoptWorkers): the worker and its export; a ring only
// where the worker maps a real guest's grants, since a local one lived
// with the old daemon's frontend; no failure, no lost ring.
func adopted(m *Model) {
	a := m.a
	m.a = Actual{Worker: a.Worker, Export: a.Export && a.Worker, Ring: a.Ring && a.Worker && !m.o.LocalFrontend, Params: a.Params,
		StrayRing: a.Ring && a.Worker && m.o.LocalFrontend}
	if !a.Worker {
		m.a.Params = ""
	} else {
		m.a.Adopted = AdoptionMatches // the transcripts restart the daemon over the same declarations
	}
}

func TestScenarios(t *testing.T) {
	eachScenario(t, func(t *testing.T, file, in string) {
		got := runScenario(t, strings.Split(in, "\n"))
		if *rewrite {
			if err := os.WriteFile(file, []byte(got), 0o644); err != nil {
				t.Fatal(err)
			}
			return
		}
		if got != in+"\n" {
			t.Errorf("transcript changed (go test ./reconciler -run Scenarios -rewrite to accept):\n--- want\n%s\n--- got\n%s", in, got)
		}
	})
}

// eachScenario runs fn, as a subtest, on every transcript's text (without
// its last newline).
func eachScenario(t *testing.T, fn func(t *testing.T, file, text string)) {
	files, err := filepath.Glob("testdata/scenarios/*.txt")
	if err != nil || len(files) == 0 {
		t.Fatalf("no scenarios: %v", err)
	}
	for _, file := range files {
		t.Run(strings.TrimSuffix(filepath.Base(file), ".txt"), func(t *testing.T) {
			b, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			fn(t, file, strings.TrimRight(string(b), "\n"))
		})
	}
}
