package reconciler

import (
	"math/rand"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"testing"
)

func kinds(acts []Action) []ActionKind {
	var ks []ActionKind
	for _, a := range acts {
		ks = append(ks, a.Kind)
	}
	return ks
}

// The devices the Plan tables start from.
var (
	planDom0  = Observed{Present: true, Online: true, Params: "aio:/x", Mode: "w", Domain0: true, Export: true, FrontendPresent: true}
	planGuest = Observed{Present: true, Online: true, Params: "aio:/x", Mode: "w", LocalFrontend: true, FrontendPresent: true}
)

func obsWith(o Observed, f func(*Observed)) Observed { f(&o); return o }

func actWith(a Actual, f func(*Actual)) Actual { f(&a); return a }

// Each case is one observation; the comment names the handshake step of
// blkif.h's state diagram (or xenbus.h) it covers.
func TestPlan(t *testing.T) { runPlanCases(t, planHandshakeCases) }

// planRunning is a disk whose worker runs and nothing else is set up.
var planRunning = Actual{Worker: true}

var planHandshakeCases = []planCase{
	{"absent and idle: nothing", Observed{}, Actual{}, nil},
	{"removed while running: release all", Observed{}, Actual{Worker: true, Ring: true, LF: true},
		[]ActionKind{ActFrontendClose, ActDisconnectRing, ActStopWorker}},
	{"toolstack wrote Initialising: start the worker first", obsWith(planDom0, func(o *Observed) { o.Backend = StateInitialising; o.Frontend = StateInitialising }), Actual{},
		[]ActionKind{ActStartWorker}},
	{"dom0: export, then InitWait", obsWith(planDom0, func(o *Observed) { o.Backend = StateInitialising; o.Frontend = StateInitialising }), planRunning,
		[]ActionKind{ActServeExport, ActBackendInitWait}},
	{"dom0: InitWait -> both halves Connected", obsWith(planDom0, func(o *Observed) { o.Backend = StateInitWait; o.Frontend = StateInitialising }), actWith(planRunning, func(a *Actual) { a.Export = true }),
		[]ActionKind{ActDom0Connect}},
	{"dom0: connected is stable", obsWith(planDom0, func(o *Observed) { o.Backend = StateConnected; o.Frontend = StateConnected; o.HotplugConnected = true }), actWith(planRunning, func(a *Actual) { a.Export = true }),
		nil},
	{"guest: backend InitWait, local frontend allocates the ring", obsWith(planGuest, func(o *Observed) { o.Backend = StateInitWait; o.Frontend = StateInitialising }), planRunning,
		[]ActionKind{ActFrontendInit}},
	{"guest: frontend Initialised with ring -> connect", obsWith(planGuest, func(o *Observed) { o.Backend = StateInitWait; o.Frontend = StateInitialised; o.RingPublished = true }), actWith(planRunning, func(a *Actual) { a.LF = true }),
		[]ActionKind{ActConnectRing}},
	{"guest: frontend Initialised without ring keys waits", obsWith(planGuest, func(o *Observed) { o.Backend = StateInitWait; o.Frontend = StateInitialised }), actWith(planRunning, func(a *Actual) { a.LF = true }),
		nil},
	{"guest: frontend skipped Initialised (Connected) still connects", obsWith(planGuest, func(o *Observed) {
		o.LocalFrontend = false
		o.Backend = StateInitWait
		o.Frontend = StateConnected
		o.RingPublished = true
	}), planRunning,
		[]ActionKind{ActConnectRing}},
	{"guest: backend Connected, local frontend connects", obsWith(planGuest, func(o *Observed) { o.Backend = StateConnected; o.Frontend = StateInitialised; o.RingPublished = true }), actWith(planRunning, func(a *Actual) { a.LF = true; a.Ring = true }),
		[]ActionKind{ActFrontendConnect}},
	{"guest: all connected is stable", obsWith(planGuest, func(o *Observed) { o.Backend = StateConnected; o.Frontend = StateConnected; o.RingPublished = true }), actWith(planRunning, func(a *Actual) { a.LF = true; a.Ring = true; a.LFConnected = true }),
		nil},
	{"frontend Closing -> backend Closing", obsWith(planGuest, func(o *Observed) { o.LocalFrontend = false; o.Backend = StateConnected; o.Frontend = StateClosing }), actWith(planRunning, func(a *Actual) { a.Ring = true }),
		[]ActionKind{ActBackendClosing}},
	{"frontend Closed -> disconnect, backend Closed", obsWith(planGuest, func(o *Observed) { o.LocalFrontend = false; o.Backend = StateClosing; o.Frontend = StateClosed }), actWith(planRunning, func(a *Actual) { a.Ring = true }),
		[]ActionKind{ActDisconnectRing}},
	{"detach: online 0 -> Closing, local frontend closes", obsWith(planGuest, func(o *Observed) { o.Online = false; o.Backend = StateConnected; o.Frontend = StateConnected }), actWith(planRunning, func(a *Actual) { a.Ring = true; a.LF = true; a.LFConnected = true }),
		[]ActionKind{ActBackendClosing, ActFrontendClose}},
	{"detach: closed and offline -> stop the worker", obsWith(planGuest, func(o *Observed) { o.Online = false; o.Backend = StateClosed; o.Frontend = StateClosed }), planRunning,
		[]ActionKind{ActStopWorker}},
	{"reconnect: frontend Initialising after Closed -> InitWait", obsWith(planGuest, func(o *Observed) { o.LocalFrontend = false; o.Backend = StateClosed; o.Frontend = StateInitialising }), planRunning,
		[]ActionKind{ActBackendInitWait}},
	{"hostile ring -> Closing with the reason", obsWith(planGuest, func(o *Observed) { o.Backend = StateConnected; o.Frontend = StateConnected; o.RingPublished = true }), actWith(planRunning, func(a *Actual) { a.LF = true; a.LFConnected = true; a.RingError = "producer index ran ahead" }),
		[]ActionKind{ActBackendClosing, ActFrontendClose}},
	{"local frontend Closed after its ring was lost -> the frontend starts over", obsWith(planGuest, func(o *Observed) { o.Backend = StateClosed; o.Frontend = StateClosed; o.RingPublished = true }), actWith(planRunning, func(a *Actual) { a.RingLost = "rsp_prod ran ahead"; a.RingBackoff.Since = 2 * second }),
		[]ActionKind{ActFrontendRestart}},
	{"local frontend Closed, no ring lost (the guest went away) -> stays closed", obsWith(planGuest, func(o *Observed) { o.Backend = StateClosed; o.Frontend = StateClosed; o.RingPublished = true }), planRunning,
		nil},
	{"local frontend Closed, disk failed -> no restart", obsWith(planGuest, func(o *Observed) { o.Backend = StateClosed; o.Frontend = StateClosed }), Actual{Failed: "no such image", RingLost: "x"},
		nil},
	{"local frontend Closed, ring still mapped -> disconnect first", obsWith(planGuest, func(o *Observed) { o.Backend = StateClosing; o.Frontend = StateClosed }), actWith(planRunning, func(a *Actual) { a.Ring = true }),
		[]ActionKind{ActDisconnectRing}},
	{"a real guest's frontend Closed -> the backend waits for it", obsWith(planGuest, func(o *Observed) { o.LocalFrontend = false; o.Backend = StateClosed; o.Frontend = StateClosed }), planRunning,
		nil},
	// XEN-HOST 5.4: libxl runs the hotplug script on InitWait only.
	{"libxl disk: Connected waits for hotplug-status", obsWith(planGuest, func(o *Observed) {
		o.LocalFrontend, o.HotplugScript = false, true
		o.Backend, o.Frontend, o.RingPublished = StateInitWait, StateInitialised, true
	}), planRunning, nil},
	{"libxl dom0 disk: Connected waits for hotplug-status", obsWith(planDom0, func(o *Observed) { o.HotplugScript = true; o.Backend = StateInitWait }), actWith(planRunning, func(a *Actual) { a.Export = true }),
		nil},
	{"own disk with a script key: no hotplug wait", obsWith(planGuest, func(o *Observed) {
		o.LocalFrontend, o.HotplugScript, o.Declared = false, true, true
		o.Backend, o.Frontend, o.RingPublished = StateInitWait, StateInitialised, true
	}), planRunning, []ActionKind{ActConnectRing}},
	{"libxl disk whose start failed still reaches InitWait", obsWith(planGuest, func(o *Observed) { o.LocalFrontend, o.HotplugScript = false, true; o.Backend = StateInitialising }), Actual{Failed: "no such file"},
		[]ActionKind{ActBackendInitWait}},
	{"own disk whose start failed stays put", obsWith(planGuest, func(o *Observed) { o.LocalFrontend, o.Declared = false, true; o.Backend = StateInitialising }), Actual{Failed: "no such file"},
		nil},
	// XEN-HOST 5.6: blkback unregisters on a frontend gone Unknown.
	{"frontend vanished after connect: unmap", obsWith(planGuest, func(o *Observed) {
		o.LocalFrontend, o.FrontendPresent, o.Frontend = false, false, StateUnknown
		o.Backend = StateConnected
	}), actWith(planRunning, func(a *Actual) { a.Ring = true }), []ActionKind{ActDisconnectRing}},
	{"frontend went Unknown after connect: unmap", obsWith(planGuest, func(o *Observed) {
		o.LocalFrontend, o.Frontend, o.Backend = false, StateUnknown, StateConnected
	}), actWith(planRunning, func(a *Actual) { a.Ring = true }), []ActionKind{ActDisconnectRing}},
	{"frontend vanished, own disk: stop the worker", obsWith(planGuest, func(o *Observed) {
		o.LocalFrontend, o.FrontendPresent, o.Frontend, o.Declared = false, false, StateUnknown, true
		o.Backend = StateClosed
	}), planRunning, []ActionKind{ActStopWorker}},
	{"frontend vanished, libxl disk: the worker waits for libxl", obsWith(planGuest, func(o *Observed) {
		o.LocalFrontend, o.FrontendPresent, o.Frontend, o.HotplugScript = false, false, StateUnknown, true
		o.Backend = StateClosed
	}), planRunning, nil},
	{"frontend not there yet before connect: wait", obsWith(planGuest, func(o *Observed) {
		o.LocalFrontend, o.FrontendPresent, o.Frontend, o.Backend = false, false, StateUnknown, StateInitWait
	}), planRunning, nil},
	// XEN-HOST 5.11: xenbus_dev_fatal.
	{"unusable ring keys: fatal, backend Closing", obsWith(planGuest, func(o *Observed) {
		o.LocalFrontend, o.Backend, o.Frontend, o.RingPublished = false, StateInitWait, StateInitialised, true
		o.FrontendError = "multi-queue-num-queues \"99\": want 1..4"
	}), planRunning, []ActionKind{ActFrontendFatal}},
	{"terminal failure: nothing until params change", obsWith(planDom0, func(o *Observed) { o.Backend = StateInitialising }), Actual{Failed: "corrupt image"},
		nil},
}

type planCase struct {
	name string
	o    Observed
	a    Actual
	want []ActionKind
}

func runPlanCases(t *testing.T, tests []planCase) {
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := kinds(Plan(tc.o, tc.a))
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("Plan = %v, want %v", got, tc.want)
			}
		})
	}
}

// What Plan decides beyond the handshake: adoption, restarts, limits,
// the kernel device, operators' requests. Each rule has a case that
// fails without it.
func TestPlanBeyondHandshake(t *testing.T) {
	dom0, guest, running, with, act := planDom0, planGuest, Actual{Worker: true}, obsWith, actWith
	dom0up := with(dom0, func(o *Observed) { o.Backend, o.Frontend, o.HotplugConnected = StateConnected, StateConnected, true })
	served := Actual{Worker: true, Export: true}
	runPlanCases(t, []planCase{
		{"adopted worker serving the declared image: kept", dom0up, act(served, func(a *Actual) { a.Adopted = AdoptionMatches }),
			[]ActionKind{ActAdoptWorker}},
		{"adopted worker serving another image: closed", dom0up, act(served, func(a *Actual) { a.Adopted = AdoptionStale }),
			[]ActionKind{ActStopWorker}},
		{"guest Connected with no local frontend (it died with the old daemon): reset", with(guest, func(o *Observed) {
			o.Backend, o.Frontend, o.RingPublished = StateConnected, StateConnected, true
		}), running, []ActionKind{ActResetOrphanRing}},
		{"a real guest's ring with no local frontend is not an orphan", with(guest, func(o *Observed) {
			o.LocalFrontend, o.Backend, o.Frontend, o.RingPublished = false, StateConnected, StateConnected, true
		}), act(running, func(a *Actual) { a.Ring = true }), nil},
		{"desired limits differ: applied", with(dom0up, func(o *Observed) { o.QoS = QoS{IOPS: 100} }), served,
			[]ActionKind{ActApplyQoS}},
		{"desired limits applied: nothing", with(dom0up, func(o *Observed) { o.QoS = QoS{IOPS: 100} }), act(served, func(a *Actual) { a.QoS = QoS{IOPS: 100} }),
			nil},
		{"worker exited, backoff running: wait", with(dom0, func(o *Observed) { o.Backend = StateConnected }), Actual{Exited: "signal: killed"},
			[]ActionKind{ActAwaitRestart}},
		{"worker exited, backoff over: restart", with(dom0, func(o *Observed) { o.Backend = StateConnected }), Actual{Exited: "signal: killed", WorkerBackoff: Backoff{Since: second}},
			[]ActionKind{ActRestartWorker}},
		{"nbd-device asked for on a connected disk: attach", with(dom0up, func(o *Observed) { o.KernelNBD = true }), served,
			[]ActionKind{ActAttachKernelNBD}},
		{"nbd-device asked for, disk not connected yet: wait", with(dom0, func(o *Observed) { o.KernelNBD, o.Backend = true, StateInitWait; o.HotplugScript = true }), served,
			nil},
		{"nbd-device no longer asked for: detach", dom0up, act(served, func(a *Actual) { a.KernelNBD = true }),
			[]ActionKind{ActDetachKernelNBD}},
		{"kernel device of a disk going offline: detached before the frontend closes", with(dom0up, func(o *Observed) { o.KernelNBD, o.Online = true, false }), act(served, func(a *Actual) { a.KernelNBD = true }),
			[]ActionKind{ActBackendClosing, ActDetachKernelNBD, ActFrontendClose}},
		{"kernel device of a removed disk: detached before the worker stops", Observed{}, act(served, func(a *Actual) { a.KernelNBD = true }),
			[]ActionKind{ActDetachKernelNBD, ActStopWorker}},
		{"kernel device whose worker died: detached", with(dom0up, func(o *Observed) { o.KernelNBD = true }), Actual{KernelNBD: true, Exited: "killed"},
			[]ActionKind{ActDetachKernelNBD}},
		{"pause asked for: the worker pauses", with(dom0up, func(o *Observed) { o.Request = RequestPause }), served,
			[]ActionKind{ActPause}},
		{"resume asked for: the worker resumes", with(dom0up, func(o *Observed) { o.Request = RequestResume }), act(served, func(a *Actual) { a.Paused = true }),
			[]ActionKind{ActResume}},
		{"snapshot asked for, handshake still moving: answered first", with(dom0, func(o *Observed) { o.Request, o.Backend = RequestSnapshot, StateInitWait }), served,
			[]ActionKind{ActSnapshot, ActDom0Connect}},
		{"request with no worker: refused", with(dom0, func(o *Observed) { o.Request = RequestPause }), Actual{},
			[]ActionKind{ActRefuseRequest, ActStartWorker}},
		{"request to a disk being removed: refused", Observed{Request: RequestSnapshot}, served,
			[]ActionKind{ActRefuseRequest, ActStopWorker}},
	})
}

// Plan is pure: its plan depends on its arguments and nothing else. Asking
// again for one input, as this test once did, cannot catch a Plan that
// remembers: no clock, no randomness and no map order reach it, so a
// repeat sees the same hidden state every time. This asks for many
// reachable inputs, then again in another order from several goroutines
// (the race detector flags state shared between calls), and after
// scribbling over the first answers (a plan must not be a cached slice
// the caller can change).
func TestPlanDeterministic(t *testing.T) {
	r := rand.New(rand.NewSource(1))
	type input struct {
		o Observed
		a Actual
	}
	var inputs []input
	for range 1000 {
		m, _ := randomReachable(r)
		// The same observation with different workers behind it, and
		// the other way round, side by side: a plan remembered from the
		// previous call would be the wrong one here.
		inputs = append(inputs, input{m.o, m.a}, input{m.o, Actual{}}, input{m.o, Actual{Worker: true}}, input{Observed{}, m.a})
	}
	first := make([][]Action, len(inputs))
	want := make([][]Action, len(inputs))
	kindsSeen := map[ActionKind]bool{}
	for i, in := range inputs {
		first[i] = Plan(in.o, in.a)
		want[i] = append([]Action(nil), first[i]...)
		for _, a := range first[i] {
			kindsSeen[a.Kind] = true
		}
	}
	if len(kindsSeen) < len(actionNames)-2 {
		t.Fatalf("the inputs exercise only %d of %d actions: %v", len(kindsSeen), len(actionNames), kindsSeen)
	}
	for _, acts := range first {
		for j := range acts {
			acts[j] = Action{Kind: ActStopWorker, Reason: "scribbled"}
		}
	}
	got := make([][]Action, len(inputs))
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, i := range rand.New(rand.NewSource(int64(w))).Perm(len(inputs)) {
				if i%4 == w {
					got[i] = Plan(inputs[i].o, inputs[i].a)
				}
			}
		}()
	}
	wg.Wait()
	for i := range inputs {
		if !reflect.DeepEqual(got[i], want[i]) {
			t.Fatalf("Plan(%+v, %+v) gave %v, then %v", inputs[i].o, inputs[i].a, want[i], got[i])
		}
	}
}

func TestParseBackendPath(t *testing.T) {
	root := "/local/domain/0/backend"
	tests := []struct {
		p    string
		want Key
		ok   bool
	}{
		{root + "/vbd3/1/51728", Key{KindVBD3, 1, 51728}, true},
		{root + "/vbd3/1/51728/state", Key{KindVBD3, 1, 51728}, true},
		{root + "/tap/0/768/params", Key{KindTap, 0, 768}, true},
		{root + "/vbd3/1", Key{}, false},
		{root + "/vbd3", Key{}, false},
		{root + "/qdisk/1/2", Key{}, false},
		{root + "/vbd3/x/2", Key{}, false},
		{root + "/vbd3/1/99999999999", Key{}, false},
		{"/local/domain/1/backend/vbd3/1/2", Key{}, false},
	}
	for _, tc := range tests {
		got, ok := parseBackendPath(root, tc.p)
		if ok != tc.ok || got != tc.want {
			t.Errorf("parseBackendPath(%q) = %v, %v; want %v, %v", tc.p, got, ok, tc.want, tc.ok)
		}
	}
}

func TestParseParams(t *testing.T) {
	tests := []struct{ in, format, path string }{
		{"aio:/img/a.raw", "aio", "/img/a.raw"},
		{"qcow:/img/a.qcow", "qcow", "/img/a.qcow"},
		{"tap:qcow:/img/a.qcow", "qcow", "/img/a.qcow"},
		{"/dev/vg/lv", "raw", "/dev/vg/lv"},
	}
	for _, tc := range tests {
		f, p, err := ParseParams(tc.in)
		if err != nil || f != tc.format || p != tc.path {
			t.Errorf("ParseParams(%q) = %q, %q, %v", tc.in, f, p, err)
		}
	}
	for _, bad := range []string{"", "qcow", "qcow:"} {
		if _, _, err := ParseParams(bad); err == nil {
			t.Errorf("ParseParams(%q) accepted", bad)
		}
	}
}

func TestReadQueue(t *testing.T) {
	keys := map[string]string{
		"queue-0/ring-ref": "8", "queue-0/event-channel": "20",
		"queue-1/ring-ref0": "9", "queue-1/ring-ref1": "10", "queue-1/event-channel": "21",
		"queue-2/ring-ref": "x", "queue-2/event-channel": "22",
	}
	get := func(k string) string { return keys[k] }
	q, msg := readQueue(get, "queue-0/", 0, false)
	if msg != "" || !reflect.DeepEqual(q, queueRing{refs: []uint32{8}, evtchn: 20}) {
		t.Fatalf("queue-0: %+v %q", q, msg)
	}
	q, msg = readQueue(get, "queue-1/", 1, true)
	if msg != "" || !reflect.DeepEqual(q, queueRing{refs: []uint32{9, 10}, evtchn: 21}) {
		t.Fatalf("queue-1: %+v %q", q, msg)
	}
	if _, msg = readQueue(get, "queue-2/", 0, false); msg == "" {
		t.Fatal("a ring-ref that is not a number was accepted")
	}
	if _, msg = readQueue(get, "queue-3/", 0, false); msg == "" {
		t.Fatal("a missing queue was accepted")
	}
	// XEN-HOST 5.16: ring-page-order present, even 0, means ring-ref0.
	keys["queue-4/ring-ref0"], keys["queue-4/event-channel"] = "11", "23"
	q, msg = readQueue(get, "queue-4/", 0, true)
	if msg != "" || !reflect.DeepEqual(q, queueRing{refs: []uint32{11}, evtchn: 23}) {
		t.Fatalf("queue-4 with ring-page-order 0: %+v %q", q, msg)
	}
}

func TestEmptyMedium(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty-cdrom.7")
	if err := os.WriteFile(empty, nil, 0o400); err != nil {
		t.Fatal(err)
	}
	full := filepath.Join(dir, "empty-cdrom.8")
	if err := os.WriteFile(full, []byte("disc"), 0o400); err != nil {
		t.Fatal(err)
	}
	for in, want := range map[string]bool{
		"": true, "  ": true, "aio:": true, "raw:": true, "tap:aio:": true,
		empty: true,                                              // libxl >= 4.19's empty drive
		full:  false, filepath.Join(dir, "empty-cdrom.9"): false, // not there
		"aio:/iso/a.iso": false, "/iso/a.iso": false, "qcow2:/x": false, "tap:qcow:/x": false,
	} {
		if got := emptyMedium(in); got != want {
			t.Errorf("emptyMedium(%q) = %v, want %v", in, got, want)
		}
	}
}
