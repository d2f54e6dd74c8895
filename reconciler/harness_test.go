package reconciler

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blktap-go/blktap/xenstore"
)

// daemonHarness runs the real daemon (Run: its watches, queue,
// reconcilers, workers started as `os.Args[0] __worker`, adoption
// sockets, API) in process, on a xenstored also in process, and lets a
// test play the toolstack and the guest by writing xenstore keys. The
// daemon reaches the xenstored through xsProxy, which injects faults.
//
// Two modes, as the daemon has:
//   - local (no Xen): the daemon plays every guest's blkfront with its
//     local frontend, rings over shared memory; domain 0's disks are
//     their NBD export;
//   - xen: ProbeHost says Xen, so the daemon plays no frontend; the test
//     writes the frontend's keys as Linux blkfront would, and the workers
//     map its ring through stubXen (fakexen_test.go).
//
// Through Options.hooks it records, per device, every effect the daemon
// applied and how every reconcile pass ended: the actions and the Actual
// the transcripts compare.
type daemonHarness struct {
	t     *testing.T
	dir   string
	xen   bool
	srv   *xenstore.Server
	xs    *xenstore.Client // the test's own, straight to the xenstored
	proxy *xsProxy

	d      *Daemon
	cancel context.CancelFunc
	done   chan error

	mu   sync.Mutex
	recs map[Key][]harnessRecord
}

// harnessRecord is one applied effect (act set) or one pass's end.
type harnessRecord struct {
	act     *Action
	err     error // the effect's, or the pass's failure
	o       *Observed
	a       Actual
	passEnd bool
}

func newDaemonHarness(t *testing.T, xenMode bool) *daemonHarness {
	t.Helper()
	dir, err := os.MkdirTemp("", "bt") // short: unix socket paths
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	h := &daemonHarness{t: t, dir: dir, xen: xenMode, recs: map[Key][]harnessRecord{}}
	h.srv = xenstore.NewServer(slog.New(slog.DiscardHandler))
	ln, err := net.Listen("unix", filepath.Join(dir, "xs.sock"))
	if err != nil {
		t.Fatal(err)
	}
	go h.srv.Serve(ln)
	t.Cleanup(func() { h.srv.Close() })
	h.proxy = startXSProxy(t, filepath.Join(dir, "px.sock"), filepath.Join(dir, "xs.sock"))
	if h.xs, err = xenstore.Dial(context.Background(), filepath.Join(dir, "xs.sock")); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.xs.Close() })
	// What a booted host has (the embedded xenstored writes the same).
	for _, kv := range [][2]string{{"/local/domain/0/name", "Domain-0"}, {"/local/domain/0/domid", "0"}, {"/local/domain/0/backend", ""}} {
		if err := h.xs.Write(context.Background(), kv[0], kv[1]); err != nil {
			t.Fatal(err)
		}
	}
	if xenMode {
		t.Setenv(envStubXen, "1")
	}
	old := ProbeHost
	ProbeHost = func() HostFacts { return HostFacts{Xen: xenMode} }
	t.Cleanup(func() { ProbeHost = old })
	h.start()
	t.Cleanup(h.stop)
	return h
}

// start runs a daemon and waits until it serves.
func (h *daemonHarness) start() {
	h.t.Helper()
	log := slog.New(slog.DiscardHandler)
	var stderr io.Writer = io.Discard
	if testing.Verbose() {
		log, stderr = slog.New(slog.NewTextHandler(os.Stderr, nil)), os.Stderr
	}
	running := make(chan *Daemon, 1)
	opts := Options{StateDir: h.dir, XenstorePath: filepath.Join(h.dir, "px.sock"), Exe: os.Args[0],
		Logger: log, WorkerStderr: stderr, hooks: &hooks{
			onRunning: func(d *Daemon) { running <- d },
			onApplied: func(k Key, act Action, err error) { h.record(k, harnessRecord{act: &act, err: err}) },
			onPassEnded: func(k Key, o *Observed, a Actual, failure error) {
				h.record(k, harnessRecord{o: o, a: a, err: failure, passEnd: true})
			},
		}}
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel, h.done = cancel, make(chan error, 1)
	go func() { h.done <- Run(ctx, opts) }()
	select {
	case h.d = <-running:
	case err := <-h.done:
		h.t.Fatalf("daemon: %v", err)
	case <-time.After(30 * time.Second):
		h.t.Fatal("daemon did not start in 30s")
	}
}

// stop ends the daemon, then closes every disk it left serving (Run
// leaves workers running for the next daemon to adopt).
func (h *daemonHarness) stop() {
	if d := h.exit(); d != nil {
		d.shutdownAll()
	}
}

// exit ends the daemon as a signal does: its workers keep serving.
func (h *daemonHarness) exit() *Daemon {
	d := h.d
	if d == nil {
		return nil
	}
	h.cancel()
	if err := <-h.done; err != nil {
		h.t.Errorf("daemon: %v", err)
	}
	h.d = nil
	return d
}

// restart ends the daemon and starts a new one, which adopts the workers.
func (h *daemonHarness) restart() {
	if d := h.exit(); d != nil {
		// What the old daemon's exit does: its local frontends and
		// guest views end with it (here they would live on in this
		// process), its control connections close, and each worker
		// waits to be adopted.
		for _, dev := range d.devices {
			dev.closeLocalFrontend(d.log)
			if dev.worker.proc != nil {
				dev.worker.proc.Release()
			}
		}
	}
	h.start()
}

func (h *daemonHarness) record(k Key, r harnessRecord) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.recs[k] = append(h.recs[k], r)
}

// records returns k's records from index from on, and how many there are.
func (h *daemonHarness) records(k Key, from int) ([]harnessRecord, int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	rs := h.recs[k]
	if from > len(rs) {
		from = len(rs)
	}
	return append([]harnessRecord(nil), rs[from:]...), len(rs)
}

// busy reports whether k is queued or being reconciled.
func (h *daemonHarness) busy(k Key) bool {
	q := h.d.q
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.pending[k] || q.active[k] || q.again[k]
}

// converge waits until the daemon has settled device k: k is queued now,
// as a watch on the test's last write would queue it, so the pass that
// follows sees every change made so far; k is settled once it is neither
// queued nor reconciled and its last pass ended without an error to retry
// (a terminal one is not retried). It returns k's last pass.
func (h *daemonHarness) converge(k Key, limit time.Duration) (harnessRecord, error) {
	h.d.q.Add(k)
	deadline := time.Now().Add(limit)
	for {
		if !h.busy(k) {
			rs, _ := h.records(k, 0)
			if last, ok := lastPass(rs); ok && (last.err == nil || isTerminal(last.err)) && !h.busy(k) {
				return last, nil
			}
		}
		if time.Now().After(deadline) {
			rs, _ := h.records(k, 0)
			last, _ := lastPass(rs)
			return last, fmt.Errorf("device %s did not settle within %v (last pass: %v)", k, limit, last.err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func lastPass(rs []harnessRecord) (harnessRecord, bool) {
	for i := len(rs) - 1; i >= 0; i-- {
		if rs[i].passEnd {
			return rs[i], true
		}
	}
	return harnessRecord{}, false
}

// await queues k every 50 ms until one of its records from index from on
// satisfies ok: for events the daemon learns of by itself (a worker's
// exit, a ring stopped), so that the next converge starts after it.
func (h *daemonHarness) await(k Key, from int, what string, ok func(harnessRecord) bool) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		rs, _ := h.records(k, from)
		for _, r := range rs {
			if ok(r) {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("device %s: the daemon never noticed %s", k, what)
		}
		h.d.q.Add(k)
		time.Sleep(50 * time.Millisecond)
	}
}

func (h *daemonHarness) read(p string) string {
	v, _ := h.xs.Read(context.Background(), p)
	return v
}

// stateLine is the transcripts' summary of device k (as Model.state
// writes it): xenstore's states as the test reads them, and what the
// daemon runs as its last pass left it.
func (h *daemonHarness) stateLine(k Key, a Actual) string {
	ctx := context.Background()
	be, fe := k.BackendPath(0), k.FrontendPath()
	var o Observed
	if _, err := h.xs.Read(ctx, be); err == nil {
		o.Present = true
		o.Backend = ParseState(h.read(be + "/state"))
		o.Online = h.read(be+"/online") != "0"
		o.Frontend = StateUnknown
		if st, err := h.xs.Read(ctx, fe+"/state"); err == nil {
			o.Frontend = ParseState(st)
		}
	}
	m := Model{o: o, a: a}
	return m.state()
}

// statusMismatch compares what device k's status keys say with what the
// daemon runs; "" when they agree.
func (h *daemonHarness) statusMismatch(k Key, a Actual) string {
	be := k.BackendPath(0)
	if _, err := h.xs.Read(context.Background(), be); err != nil {
		return ""
	}
	var bad []string
	if pid := h.read(be + "/" + keyWorkerPid); (pid != "") != a.Worker {
		bad = append(bad, fmt.Sprintf("worker-pid %q with worker %v", pid, a.Worker))
	}
	if exp := h.read(be + "/" + keyExport); (exp != "") != (a.Export || a.LFConnected) {
		bad = append(bad, fmt.Sprintf("export %q with export %v, guest view %v", exp, a.Export, a.LFConnected))
	}
	phase := h.read(be + "/" + keyPhase)
	if a.Failed != "" && phase != PhaseFailed && phase != PhaseClosed && phase != PhaseClosing {
		bad = append(bad, fmt.Sprintf("phase %q with a terminal failure", phase))
	}
	return strings.Join(bad, "; ")
}

// image makes a raw image of 1 MiB at rel under the state directory (an
// image directory the daemon allows).
func (h *daemonHarness) image(rel string) string {
	h.t.Helper()
	p := filepath.Join(h.dir, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		h.t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY, 0o600)
	if err == nil {
		err = errors.Join(f.Truncate(1<<20), f.Close())
	}
	if err != nil {
		h.t.Fatal(err)
	}
	return p
}
