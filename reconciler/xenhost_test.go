package reconciler

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blktap-go/blktap/tapengine/worker"
	"github.com/blktap-go/blktap/xenstore"
)

// The test binary doubles as the worker executable: the daemon under test
// starts `os.Args[0] __worker ...`, as `blktap run` starts `blktap __worker`.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "__worker" {
		harnessWorker(os.Args)
		log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
		os.Exit(worker.Main(log, slices.Contains(os.Args, "--adopt")))
	}
	os.Exit(m.Run())
}

// harness is a daemon on an embedded xenstored, reconciling as Run does
// (one reconciler, a fast resync) without Run's signals, API or YAML.
type harness struct {
	t   *testing.T
	d   *Daemon
	xs  *xenstore.Client
	srv *xenstore.Server
	dir string
}

// startXenstore serves a fresh xenstore on a socket in a new directory
// (short: a unix socket path is at most 108 bytes) and dials it. The
// directory goes when the test ends; closing srv and xs is the caller's.
func startXenstore(t *testing.T) (string, *xenstore.Server, *xenstore.Client) {
	t.Helper()
	dir, err := os.MkdirTemp("", "bt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	srv := xenstore.NewServer(slog.New(slog.DiscardHandler))
	ln, err := net.Listen("unix", filepath.Join(dir, "xs.sock"))
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	xs, err := xenstore.Dial(context.Background(), filepath.Join(dir, "xs.sock"))
	if err != nil {
		srv.Close()
		t.Fatal(err)
	}
	return dir, srv, xs
}

func newHarness(t *testing.T, localFrontend bool, opts ...func(*Options)) *harness {
	t.Helper()
	dir, srv, xs := startXenstore(t)
	ctx, cancel := context.WithCancel(context.Background())
	for _, kv := range [][2]string{{"/local/domain/0/domid", "0"}, {"/local/domain/0/backend", ""}} {
		if err := xs.Write(ctx, kv[0], kv[1]); err != nil {
			t.Fatal(err)
		}
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	d := emptyDaemon(Options{StateDir: dir, Exe: os.Args[0], WorkerStderr: io.Discard, Logger: log}, log)
	d.xs = xs
	d.xsPath = filepath.Join(dir, "xs.sock")
	d.localFrontend = localFrontend
	for _, o := range opts {
		o(&d.opts)
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		d.reconcileQueued(ctx)
	}()
	go func() {
		defer wg.Done()
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				d.rescan(ctx, d.q.Add)
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		d.q.Close()
		wg.Wait()
		d.shutdownAll()
		xs.Close()
		srv.Close()
	})
	return &harness{t: t, d: d, xs: xs, srv: srv, dir: dir}
}

// image makes an empty raw image of 1 MiB in the state directory.
func (h *harness) image(name string) string {
	h.t.Helper()
	p := filepath.Join(h.dir, name)
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		h.t.Fatal(err)
	}
	if err := os.Truncate(p, 1<<20); err != nil {
		h.t.Fatal(err)
	}
	return p
}

func (h *harness) write(kv ...string) {
	h.t.Helper()
	for i := 0; i+1 < len(kv); i += 2 {
		if err := h.xs.Write(context.Background(), kv[i], kv[i+1]); err != nil {
			h.t.Fatalf("write %s: %v", kv[i], err)
		}
	}
}

func (h *harness) read(p string) string {
	v, _ := h.xs.Read(context.Background(), p)
	return v
}

// libxlDisk declares a disk as libxl >= 4.19 does for backendtype=tap
// (XEN-HOST section 3): a hotplug script, no blktap/source.
func (h *harness) libxlDisk(k Key, params string, extra ...string) (be, fe string) {
	be, fe = k.BackendPath(0), k.FrontendPath()
	dom := strings.TrimPrefix(xenstore.DomainPath(k.Domid), "/local/domain/")
	h.write(be+"/frontend", fe, be+"/frontend-id", dom, be+"/online", "1", be+"/removable", "0",
		be+"/bootable", "1", be+"/dev", "xvdb", be+"/type", k.Kind, be+"/mode", "w",
		be+"/device-type", "disk", be+"/discard-enable", "1", be+"/specification", "xen",
		be+"/params", params, be+"/script", "/etc/xen/scripts/block-tap",
		fe+"/backend", be, fe+"/backend-id", "0", fe+"/virtual-device", "51728", fe+"/device-type", "disk",
		fe+"/state", "1")
	h.write(extra...)
	h.write(be+"/state", "1")
	return be, fe
}

// waitFor polls until every path has its value (a value "!" means absent).
func (h *harness) waitFor(what string, want map[string]string) {
	h.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		bad := ""
		for p, v := range want {
			got, err := h.xs.Read(context.Background(), p)
			if v == "!" {
				if err == nil {
					bad = p + " present: " + got
				}
			} else if got != v {
				bad = p + " = " + got + ", want " + v
			}
			if bad != "" {
				break
			}
		}
		if bad == "" {
			return
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("%s: %s (error %q)", what, bad, h.readAny("/blktap/error"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// readAny reads suffix under the first backend directory there is, for
// failure messages.
func (h *harness) readAny(suffix string) string {
	var out []string
	for _, kind := range []string{KindVBD3, KindTap, KindVBD} {
		doms, _ := h.xs.Directory(context.Background(), "/local/domain/0/backend/"+kind)
		for _, dom := range doms {
			devs, _ := h.xs.Directory(context.Background(), "/local/domain/0/backend/"+kind+"/"+dom)
			for _, dev := range devs {
				out = append(out, h.read("/local/domain/0/backend/"+kind+"/"+dom+"/"+dev+suffix))
			}
		}
	}
	return strings.Join(out, "; ")
}

// XEN-HOST 5.4: a libxl disk stays at InitWait, its status saying the
// image is open (what `blktap hotplug add` waits for), until the hotplug
// script reports; only then does the backend try to connect.
func TestXenLibxlDiskWaitsForHotplug(t *testing.T) {
	h := newHarness(t, false)
	k := Key{KindVBD3, 3, 51728}
	be, fe := h.libxlDisk(k, "aio:"+h.image("a.raw"))
	h.waitFor("InitWait with the image open", map[string]string{be + "/state": "2", be + "/" + keyPhase: PhaseWaiting})
	h.write(fe+"/ring-ref", "8", fe+"/event-channel", "5", fe+"/protocol", "x86_64-abi", fe+"/state", "3")
	time.Sleep(500 * time.Millisecond) // some resyncs: the ring must stay untouched
	if st, ph := h.read(be+"/state"), h.read(be+"/"+keyPhase); st != "2" || ph != PhaseWaiting {
		t.Fatalf("before hotplug-status: state %s phase %s (error %q)", st, ph, h.read(be+"/"+keyError))
	}
	h.write(be+"/hotplug-status", "connected")
	// No Xen here: the connect attempt itself fails, which shows it ran.
	deadline := time.Now().Add(20 * time.Second)
	for h.read(be+"/"+keyPhase) == PhaseWaiting {
		if time.Now().After(deadline) {
			t.Fatal("hotplug-status=connected did not release the connect")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// XEN-HOST 5.4 and the `blktap hotplug add` contract: a libxl disk whose
// image is missing still reaches InitWait, phase failed, with the reason.
func TestXenLibxlDiskFailedStartReachesInitWait(t *testing.T) {
	h := newHarness(t, false)
	k := Key{KindVBD3, 3, 51728}
	be, _ := h.libxlDisk(k, "aio:"+filepath.Join(h.dir, "missing.raw"))
	h.waitFor("InitWait, failed", map[string]string{be + "/state": "2", be + "/" + keyPhase: PhaseFailed})
	if msg := h.read(be + "/" + keyError); !strings.Contains(msg, "missing.raw") {
		t.Fatalf("blktap/error = %q, want the missing image named", msg)
	}
	// The daemon's own disks have no hotplug script to tell: they stay.
	k2 := Key{KindVBD3, 3, 51744}
	if err := WriteDevice(context.Background(), h.xs, DeviceSpec{Key: k2, Name: "own", Format: "raw",
		Path: filepath.Join(h.dir, "missing.raw"), Mode: "w", Vdev: "xvdc", Source: "attach"}); err != nil {
		t.Fatal(err)
	}
	be2 := k2.BackendPath(0)
	h.waitFor("own disk failed", map[string]string{be2 + "/" + keyPhase: PhaseFailed, be2 + "/state": "1"})
}

// XEN-HOST 5.6: a frontend that vanishes after connect is Closed: the ring
// is unmapped and the backend Closed; a disk the daemon declared also
// loses its worker, a libxl disk keeps it until libxl removes it.
func TestFrontendVanished(t *testing.T) {
	h := newHarness(t, true)
	ctx := context.Background()
	own := Key{KindVBD3, 3, 51728}
	if err := WriteDevice(ctx, h.xs, DeviceSpec{Key: own, Name: "own", Format: "raw",
		Path: h.image("own.raw"), Mode: "w", Vdev: "xvdb", Source: "attach"}); err != nil {
		t.Fatal(err)
	}
	be := own.BackendPath(0)
	h.waitFor("own disk connected", map[string]string{be + "/state": "4", be + "/" + keyPhase: PhaseConnected})
	if err := h.xs.Rm(ctx, own.FrontendPath()); err != nil {
		t.Fatal(err)
	}
	h.waitFor("own disk closed", map[string]string{be + "/state": "6", be + "/" + keyPhase: PhaseClosed, be + "/" + keyWorkerPid: ""})

	lx := Key{KindVBD3, 4, 51728}
	be2, fe2 := h.libxlDisk(lx, "aio:"+h.image("lx.raw"))
	h.waitFor("libxl disk InitWait", map[string]string{be2 + "/state": "2"})
	h.write(be2+"/hotplug-status", "connected")
	h.waitFor("libxl disk connected", map[string]string{be2 + "/state": "4", be2 + "/" + keyPhase: PhaseConnected})
	pid := h.read(be2 + "/" + keyWorkerPid)
	h.write(fe2+"/state", "0") // went Unknown
	h.waitFor("libxl disk closed", map[string]string{be2 + "/state": "6"})
	time.Sleep(200 * time.Millisecond)
	if got := h.read(be2 + "/" + keyWorkerPid); got == "" || got != pid {
		t.Fatalf("libxl disk's worker pid %q, want %q still running", got, pid)
	}
}

// XEN-HOST 5.11: unusable ring keys make the backend go Closing, with the
// reason where xenbus_dev_fatal writes it; the frontend's keys are left.
func TestFrontendFatal(t *testing.T) {
	h := newHarness(t, false)
	k := Key{KindVBD3, 3, 51712}
	if err := WriteDevice(context.Background(), h.xs, DeviceSpec{Key: k, Name: "f", Format: "raw",
		Path: h.image("f.raw"), Mode: "w", Vdev: "xvda", Source: "attach"}); err != nil {
		t.Fatal(err)
	}
	be, fe := k.BackendPath(0), k.FrontendPath()
	h.waitFor("InitWait", map[string]string{be + "/state": "2"})
	h.write(fe+"/ring-page-order", "9", fe+"/ring-ref0", "8", fe+"/event-channel", "5", fe+"/state", "3")
	node := "/local/domain/0/error/backend/vbd3/3/51712/error"
	h.waitFor("Closing", map[string]string{be + "/state": "5", fe + "/state": "3", fe + "/ring-page-order": "9"})
	h.waitFor("error reported", map[string]string{node: h.read(node)})
	if msg := h.read(node); !strings.Contains(msg, "ring-page-order") {
		t.Fatalf("%s = %q", node, msg)
	}
	h.waitFor("status", map[string]string{be + "/" + keyError: h.read(node)})
	// The frontend gives up and starts over with good keys: connect again,
	// the stale error gone.
	h.write(fe+"/state", "6")
	h.waitFor("Closed", map[string]string{be + "/state": "6"})
	h.write(fe+"/ring-page-order", "0", fe+"/state", "1")
	h.waitFor("InitWait again", map[string]string{be + "/state": "2", node: "!"})
}

// XEN-HOST 5.10, 5.14, 5.16: what observe reads from the toolstack's and
// the frontend's keys.
func TestObserveXenKeys(t *testing.T) {
	h := newHarness(t, false)
	ctx := context.Background()
	k := Key{KindVBD3, 3, 51728}
	be, fe := h.libxlDisk(k, "aio:"+h.image("c.raw"), "/local/domain/0/backend/vbd3/3/51728/discard-enable", "0")
	h.write(fe+"/device-type", "cdrom", fe+"/ring-page-order", "0", fe+"/ring-ref0", "7", fe+"/event-channel", "3")
	s, err := h.d.observe(ctx, h.d.newDevice(k))
	if err != nil {
		t.Fatal(err)
	}
	if s.discard || !s.Cdrom || !s.HotplugScript || s.Declared {
		t.Fatalf("discard %v cdrom %v script %v declared %v", s.discard, s.Cdrom, s.HotplugScript, s.Declared)
	}
	if !s.RingPublished || !slices.Equal(s.ringRefs, []uint32{7}) || s.FrontendError != "" {
		t.Fatalf("ring-page-order 0: refs %v published %v error %q", s.ringRefs, s.RingPublished, s.FrontendError)
	}
	h.write(fe+"/protocol", "vax-abi")
	if s, _ = h.d.observe(ctx, h.d.newDevice(k)); !strings.Contains(s.FrontendError, "protocol") {
		t.Fatalf("bad protocol: FrontendError %q", s.FrontendError)
	}
	_ = be
}

func TestDiskKeysDiscardAndCDROM(t *testing.T) {
	dev := &device{worker: workerState{size: 1 << 20}}
	keys := func(s snapshot) map[string]string {
		m := map[string]string{}
		for _, kv := range diskKeys(dev, s) {
			m[kv[0]] = kv[1]
		}
		return m
	}
	if m := keys(snapshot{discard: true}); m["feature-discard"] != "1" || m["info"] != "0" {
		t.Fatalf("plain disk: %v", m)
	}
	if m := keys(snapshot{discard: false, Observed: Observed{Cdrom: true}}); m["feature-discard"] != "" || m["info"] != "1" {
		t.Fatalf("discard-enable=0 cdrom: %v", m)
	}
	dev.worker.readOnly = true
	if m := keys(snapshot{Observed: Observed{Cdrom: true}}); m["info"] != "5" {
		t.Fatalf("read-only cdrom: info %s", m["info"])
	}
}

// WriteDevice declares the daemon's own disks with libxl's discard default
// and a status subtree the guest cannot read.
func TestWriteDeviceKeys(t *testing.T) {
	h := newHarness(t, false)
	ctx := context.Background()
	k := Key{KindVBD3, 3, 51728}
	if err := WriteDevice(ctx, h.xs, DeviceSpec{Key: k, Name: "w", Format: "raw",
		Path: h.image("w.raw"), Mode: "w", Vdev: "xvdb", Source: "attach"}); err != nil {
		t.Fatal(err)
	}
	be := k.BackendPath(0)
	if v := h.read(be + "/discard-enable"); v != "1" {
		t.Fatalf("discard-enable = %q", v)
	}
	h.waitFor("waiting", map[string]string{be + "/" + keyPhase: PhaseWaiting})
	for _, p := range []string{statusDir, keySource, keyName, keyPhase, keyError} {
		perms, err := h.xs.GetPerms(ctx, be+"/"+p)
		if err != nil {
			t.Fatal(err)
		}
		if len(perms) != 1 || perms[0] != (xenstore.Perm{Domid: 0, Access: xenstore.PermNone}) {
			t.Errorf("%s perms %v, want [n0]", p, perms)
		}
	}
	if perms, _ := h.xs.GetPerms(ctx, be+"/state"); len(perms) != 2 {
		t.Errorf("backend state perms %v: the guest must still read the backend", perms)
	}
}

// XEN-HOST 5.18: a libxl disk has no blktap/ before the daemon writes it;
// it is created locked.
func TestStatusDirLockedForLibxlDisk(t *testing.T) {
	h := newHarness(t, false)
	ctx := context.Background()
	k := Key{KindVBD3, 3, 51728}
	be, _ := h.libxlDisk(k, "aio:"+h.image("l.raw"))
	if err := h.xs.SetPerms(ctx, be, []xenstore.Perm{{Domid: 0, Access: xenstore.PermNone}, {Domid: 3, Access: xenstore.PermRead}}); err != nil {
		t.Fatal(err)
	}
	h.waitFor("waiting", map[string]string{be + "/" + keyPhase: PhaseWaiting})
	for _, p := range []string{statusDir, keyPhase, keyImagePath} {
		perms, err := h.xs.GetPerms(ctx, be+"/"+p)
		if err != nil {
			t.Fatal(err)
		}
		if len(perms) != 1 || perms[0].Access != xenstore.PermNone {
			t.Errorf("%s perms %v, want [n0]", p, perms)
		}
	}
}

// bareDaemon is a daemon on an embedded xenstored with nothing reconciling,
// for tests of one step.
