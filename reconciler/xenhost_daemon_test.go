package reconciler

import (
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/tapengine/worker"
	"github.com/blktap-go/blktap/xenstore"
)

func bareDaemon(t *testing.T) (*Daemon, *xenstore.Server, string) {
	t.Helper()
	dir, srv, xs := startXenstore(t)
	t.Cleanup(func() { xs.Close(); srv.Close() })
	d := emptyDaemon(Options{StateDir: dir}, slog.New(slog.DiscardHandler))
	d.xs = xs
	return d, srv, dir
}

// XEN-HOST 5.6: @releaseDomain names no domain; every device of a domain
// whose home is gone is looked at again.
func TestRequeueReleased(t *testing.T) {
	d, _, _ := bareDaemon(t)
	ctx := context.Background()
	if err := d.xs.Write(ctx, "/local/domain/3/name", "alive"); err != nil {
		t.Fatal(err)
	}
	alive, dead := Key{KindVBD3, 3, 51712}, Key{KindVBD3, 7, 51712}
	d.devices[alive], d.devices[dead] = d.newDevice(alive), d.newDevice(dead)
	d.requeueReleased(ctx)
	if !d.q.pending[dead] || d.q.pending[alive] {
		t.Fatalf("queued %v, want only %v", d.q.pending, dead)
	}
}

// XEN-HOST 5.15: in a driver domain the backend lives under the daemon's
// own home, read from its relative "domid" key.
func TestSelfDomid(t *testing.T) {
	d, srv, dir := bareDaemon(t)
	ctx := context.Background()
	if got := SelfDomid(ctx, d.xs); got != 0 {
		t.Fatalf("no domid key: %d, want 0", got)
	}
	ln, err := net.Listen("unix", filepath.Join(dir, "dom5.sock"))
	if err != nil {
		t.Fatal(err)
	}
	go srv.ServeDomain(ln, 5)
	// As libxl makes a domain's home: the domain owns it.
	if err := d.xs.Write(ctx, "/local/domain/5/domid", "5"); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"/local/domain/5", "/local/domain/5/domid"} {
		if err := d.xs.SetPerms(ctx, p, []xenstore.Perm{{Domid: 5, Access: xenstore.PermNone}}); err != nil {
			t.Fatal(err)
		}
	}
	xs5, err := xenstore.Dial(ctx, filepath.Join(dir, "dom5.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer xs5.Close()
	if got := SelfDomid(ctx, xs5); got != 5 {
		t.Fatalf("driver domain: %d, want 5", got)
	}
	d.self = 5
	k := Key{KindVBD, 3, 51712}
	if got := d.backendPath(k); got != "/local/domain/5/backend/vbd/3/51712" {
		t.Fatalf("backendPath %s", got)
	}
	if got := d.errorNode(k); got != "/local/domain/5/error/backend/vbd/3/51712/error" {
		t.Fatalf("errorNode %s", got)
	}
}

// XEN-HOST 5.19: physical-device-path names a unix socket or nothing.
func TestPhysicalDevicePathUnixOnly(t *testing.T) {
	d, _, dir := bareDaemon(t)
	ctx := context.Background()
	k := Key{KindVBD, 0, 768}
	be := d.backendPath(k)
	for _, tc := range []struct {
		network, addr, want string
	}{{"tcp", "127.0.0.1:0", ""}, {"unix", filepath.Join(dir, "e.sock"), "nbd+unix:///?socket=" + filepath.Join(dir, "e.sock")}} {
		if err := d.xs.Write(ctx, be+"/state", "2"); err != nil {
			t.Fatal(err)
		}
		d.xs.Rm(ctx, be+"/physical-device-path")
		ln, err := net.Listen(tc.network, tc.addr)
		if err != nil {
			t.Fatal(err)
		}
		if err := d.publishDevicePath(ctx, k, be, ln); err != nil {
			t.Fatal(err)
		}
		ln.Close()
		got, err := d.xs.Read(ctx, be+"/physical-device-path")
		if tc.want == "" && err == nil {
			t.Errorf("%s export: physical-device-path %q written", tc.network, got)
		}
		if tc.want != "" && got != tc.want {
			t.Errorf("%s export: physical-device-path %q, want %q", tc.network, got, tc.want)
		}
	}
	// A hotplug script's own path (block-tap's tap-ctl link) stands.
	d.xs.Write(ctx, be+"/physical-device-path", "/run/blktap-control/nbd7.0")
	ln, err := net.Listen("unix", filepath.Join(dir, "f.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := d.publishDevicePath(ctx, k, be, ln); err != nil {
		t.Fatal(err)
	}
	if got, _ := d.xs.Read(ctx, be+"/physical-device-path"); got != "/run/blktap-control/nbd7.0" {
		t.Errorf("hotplug script's physical-device-path replaced by %q", got)
	}
}

// What libxl does with physical-device-path (libxl_disk.c
// libxl__device_disk_find_local_path, libxl_dm.c): a tap disk's value is
// wrapped as nbd+unix by libxl, a script-driven vbd's goes to QEMU as is.
func TestDevicePathPerBackendKind(t *testing.T) {
	for _, tc := range []struct{ kind, sock, want string }{
		{KindVBD3, "/run/blktap/d1-xvda.sock", "/run/blktap/d1-xvda.sock"},
		{KindTap, "/run/blktap/d1-xvda.sock", "/run/blktap/d1-xvda.sock"},
		{KindVBD, "/run/blktap/d1-xvda.sock", "nbd+unix:///?socket=/run/blktap/d1-xvda.sock"},
		{KindVBD, "", ""},
		{KindVBD, "/run/blk,tap/x.sock", ""}, // would split QEMU's -drive
	} {
		if got := devicePath(tc.kind, tc.sock); got != tc.want {
			t.Errorf("devicePath(%s, %q) = %q, want %q", tc.kind, tc.sock, got, tc.want)
		}
	}
}

// XEN-HOST 5.8: on a Xen host the daemon never embeds a xenstored nor
// plays a frontend; what is missing stops it at start, with the fix.
func TestConnectXenstoreOnXenHost(t *testing.T) {
	defer func(p func() HostFacts) { ProbeHost = p }(ProbeHost)
	d, _, dir := bareDaemon(t)
	real := d.xs
	ctx := context.Background()

	ProbeHost = func() HostFacts { return HostFacts{Xen: true, MissingDev: []string{"/dev/xen/gntdev"}} }
	d.xs = nil
	d.opts.XenstorePath = filepath.Join(dir, "xs.sock")
	if err := d.connectXenstore(ctx); err == nil || !strings.Contains(err.Error(), "modprobe xen-gntdev xen-evtchn") {
		t.Fatalf("gntdev missing: %v", err)
	}

	ProbeHost = func() HostFacts { return HostFacts{Xen: true} }
	d.opts.XenstorePath = filepath.Join(dir, "nobody.sock")
	err := d.connectXenstore(ctx)
	if err == nil || !strings.Contains(err.Error(), "xenstored is not answering at "+d.opts.XenstorePath+" (start xenstored / xencommons)") {
		t.Fatalf("xenstored down: %v", err)
	}
	if d.embedded != nil || d.xs != nil {
		t.Fatal("embedded a xenstored on a Xen host")
	}

	ProbeHost = func() HostFacts { return HostFacts{Xen: true, GrantCopy: true} }
	d.opts.XenstorePath = filepath.Join(dir, "xs.sock")
	d.offerPersistent = true
	if err := d.connectXenstore(ctx); err != nil {
		t.Fatal(err)
	}
	defer d.xs.Close()
	if d.localFrontend || d.embedded != nil {
		t.Fatalf("Xen host: localFrontend %v embedded %v", d.localFrontend, d.embedded != nil)
	}
	if d.offerPersistent {
		t.Fatal("persistent grants offered on a host with grant copy")
	}
	d.xs = real
}

// fakeAdoptable answers a daemon's adoption on path as a worker that
// serves a ring over transport; it reports every op it is asked.
func fakeAdoptable(t *testing.T, path, transport string) <-chan string {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ops := make(chan string, 16)
	go func() {
		c, err := ln.AcceptUnix()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 1<<16)
		for {
			n, _, _, _, err := c.ReadMsgUnix(buf, nil)
			if err != nil {
				return
			}
			var req worker.Request
			if json.Unmarshal(buf[:n], &req) != nil {
				return
			}
			ops <- req.Op
			rep := worker.Reply{OK: true}
			if req.Op == worker.OpDescribe {
				rep.Describe = &worker.Describe{Pid: os.Getpid(), Name: "x", Format: "raw", Path: "/img",
					Size: 1 << 20, Open: true, Ring: true, Transport: transport}
			}
			b, _ := json.Marshal(rep)
			if _, _, err := c.WriteMsgUnix(b, nil, nil); err != nil {
				return
			}
		}
	}()
	return ops
}

// XEN-HOST 5 (adoption): a worker serving a real guest's ring keeps it
// through a daemon restart; a local-frontend ring is let go of, as Plan's
// first step, and reconnected.
func TestAdoptKeepsXenRing(t *testing.T) {
	for _, tc := range []struct {
		transport  string
		keep       bool
		disconnect bool
	}{{"xen", true, false}, {"local", false, true}, {"", false, true}} {
		t.Run("transport="+tc.transport, func(t *testing.T) {
			d, _, _ := bareDaemon(t)
			k := Key{KindVBD3, 3, 51728}
			ops := fakeAdoptable(t, d.adoptPath(k), tc.transport)
			d.adoptWorkers(context.Background())
			dev := d.devices[k]
			if dev == nil {
				t.Fatal("not adopted")
			}
			if dev.rings.ring != tc.keep {
				t.Errorf("dev.ring = %v, want %v", dev.rings.ring, tc.keep)
			}
			// A ring not kept is Plan's to release (disconnect-stray-ring).
			if dev.worker.strayRing != tc.disconnect {
				t.Errorf("strayRing = %v, want %v", dev.worker.strayRing, tc.disconnect)
			}
			if acts := Plan(Observed{Present: true, Online: true}, dev.actual(snapshot{})); tc.disconnect {
				if len(acts) == 0 || acts[0].Kind != ActDisconnectStrayRing {
					t.Fatalf("Plan = %v, want disconnect-stray-ring first", acts)
				}
				if err := d.apply(context.Background(), dev, snapshot{}, acts[0], d.log); err != nil {
					t.Fatal(err)
				}
			}
			var got []string
			for len(ops) > 0 {
				got = append(got, <-ops)
			}
			if slices.Contains(got, worker.OpDisconnect) != tc.disconnect {
				t.Errorf("ops %v: disconnect sent %v, want %v", got, !tc.disconnect, tc.disconnect)
			}
		})
	}
}

// A detach removes the backend directory while observe reads its keys one
// by one: what it read must not look like a new device (online, state
// Unknown, the old params) that Plan opens the image for again.
func TestObserveBackendRemovedMidway(t *testing.T) {
	d, _, _ := bareDaemon(t)
	ctx := context.Background()
	k := Key{KindVBD3, 0, 51744}
	be := k.BackendPath(0)
	for _, removeAfter := range []string{"params", "mode", "online", "state", "feature-max-indirect-segments"} {
		for _, kv := range [][2]string{{"params", "aio:/img/a.raw"}, {"mode", "w"}, {"online", "0"}, {"state", "6"}, {keySource, "attach"}} {
			if err := d.xs.Write(ctx, be+"/"+kv[0], kv[1]); err != nil {
				t.Fatal(err)
			}
		}
		testHookObserveRead = func(key string) {
			if key == removeAfter {
				if err := d.xs.Rm(ctx, be); err != nil {
					t.Error(err)
				}
			}
		}
		s, err := d.observe(ctx, d.newDevice(k))
		testHookObserveRead = nil
		if err != nil {
			t.Fatal(err)
		}
		if s.Present {
			t.Errorf("removed after reading %s: observed present (params %q online %v state %v)", removeAfter, s.Params, s.Online, s.Backend)
		}
		if acts := Plan(s.Observed, Actual{}); len(acts) != 0 {
			t.Errorf("removed after reading %s: Plan %v for a removed device", removeAfter, acts)
		}
	}
}
