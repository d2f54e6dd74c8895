package reconciler

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/config"
	"github.com/blktap-go/blktap/formats/nbd"
	"github.com/blktap-go/blktap/formats/ram"
)

func TestNBDAllowed(t *testing.T) {
	dir := t.TempDir()
	srv := filepath.Join(dir, "srv")
	link := filepath.Join(dir, "link")
	if err := os.Mkdir(srv, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(srv, link); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(dir, filepath.Join(srv, "up")); err != nil {
		t.Fatal(err)
	}
	allow := []string{srv, "/srv/nbd", "/run/one.sock", "10.1.0.0/16", "storage.example:10810", "Backup.Example", "[fd00::7]:10809", "::1"}
	if err := CheckNBDAllow(allow); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		uri  string
		want bool
	}{
		{"nbd+unix:///?socket=/srv/nbd/a.sock", true},
		{"nbd+unix:///x?socket=/run/one.sock", true},
		{"nbd+unix:///?socket=/run/one.sock2", false},
		{"nbd+unix:///?socket=/srv/nbd2/a.sock", false},
		{"nbd+unix:///?socket=/srv/nbd/../../etc/sock", false},
		{"nbd+unix:///?socket=" + link + "/a.sock", true},        // a link into an allowed directory
		{"nbd+unix:///?socket=" + srv + "/up/other.sock", false}, // a link out of it
		{"nbd://10.1.2.3/e", true},
		{"nbd://10.2.2.3/e", false},
		{"nbd://storage.example:10810/e", true},
		{"nbd://storage.example/e", false}, // port 10809, not the one allowed
		{"nbd://backup.example:1234/e", true},
		{"nbd://[fd00::7]/e", true},
		{"nbd://[fd00::7]:10810/e", false},
		{"nbd://[::1]:4000/", true},
		{"nbd://127.0.0.1/", false},
	} {
		u, err := nbd.ParseURI(c.uri)
		if err != nil {
			t.Fatalf("%s: %v", c.uri, err)
		}
		if got := NBDAllowed(u, allow); got != c.want {
			t.Errorf("%s: allowed %v, want %v", c.uri, got, c.want)
		}
	}
	for _, bad := range []string{"", "relative/dir", "10.0.0.0/33", "host:0", "host:99999", ":80"} {
		if err := CheckNBDAllow([]string{bad}); err == nil {
			t.Errorf("--nbd-allow %q accepted", bad)
		}
	}
}

func TestMemTotal(t *testing.T) {
	p := filepath.Join(t.TempDir(), "meminfo")
	os.WriteFile(p, []byte("MemTotal:        8000000 kB\nMemFree:  1 kB\n"), 0o600)
	if got := memTotal(p); got != 8000000<<10 {
		t.Errorf("memTotal = %d", got)
	}
	os.WriteFile(p, []byte("MemFree:  1 kB\n"), 0o600)
	if got := memTotal(p); got != 0 {
		t.Errorf("no MemTotal: %d", got)
	}
	if real := memTotal("/proc/meminfo"); real > 0 && DefaultRAMMax() != real/2 {
		t.Errorf("DefaultRAMMax %d, MemTotal %d", DefaultRAMMax(), real)
	}
}

// Issue 16 item 5: nbd: sources only from the image directories' sockets
// and what --nbd-allow names; ram: sizes up to --ram-max.
func TestSourceConfinement(t *testing.T) {
	h := newHarness(t, true, func(o *Options) { o.RAMMax = 8 << 20 })
	ctx := context.Background()
	attach := func(devid uint32, format, path string) Key {
		t.Helper()
		k := Key{KindVBD3, 0, devid}
		if err := WriteDevice(ctx, h.xs, DeviceSpec{Key: k, Name: fmt.Sprintf("d%d", devid), Format: format, Path: path, Mode: "w", Vdev: "xvdb", Source: "attach"}); err != nil {
			t.Fatal(err)
		}
		return k
	}
	// A disk whose export (a socket in the state directory, an image
	// directory) the nbd: disks below connect to.
	base := attach(51728, "raw", h.image("a.raw"))
	h.waitPhase(base, PhaseConnected, "")
	sock := filepath.Join(h.dir, "d51728.sock")
	ok := attach(51744, "nbd", "nbd+unix:///?socket="+sock)
	h.waitPhase(ok, PhaseConnected, "")

	other, err := os.MkdirTemp("", "btnbd")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(other)
	outside := filepath.Join(other, "x.sock")
	ln, err := net.Listen("unix", outside)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	refused := attach(51760, "nbd", "nbd+unix:///?socket="+outside)
	h.waitPhase(refused, PhaseFailed, "--nbd-allow")
	tcp := attach(51776, "nbd", "nbd://192.0.2.1:10809/x")
	h.waitPhase(tcp, PhaseFailed, "host 192.0.2.1:10809")
	for _, own := range []string{filepath.Join(h.dir, APISocket), h.d.adoptPath(base)} {
		if err := h.d.checkNBDSource("nbd+unix:///?socket=" + own); err == nil || !strings.Contains(err.Error(), "the daemon's own") {
			t.Errorf("%s: %v", own, err)
		}
	}

	name := fmt.Sprintf("bt-test-%d", os.Getpid())
	t.Cleanup(func() { ram.Remove(name, ram.Options{}); ram.Remove(name+"-big", ram.Options{}) })
	small := attach(51792, "ram", name+"?size=4M")
	h.waitPhase(small, PhaseConnected, "")
	big := attach(51808, "ram", name+"-big?size=16M")
	h.waitPhase(big, PhaseFailed, "more than --ram-max 8M")
	if _, err := os.Stat(ram.Path(ram.DefaultDir, name+"-big")); err == nil {
		t.Errorf("the refused RAM disk was made")
	}
	// The same rules hold for resume onto another image.
	if err := h.d.request(ctx, base, RequestPause, DeviceOp{}); err != nil {
		t.Fatal(err)
	}
	err = h.d.request(ctx, base, RequestResume, DeviceOp{Format: "nbd", Path: "nbd://192.0.2.1:10809/x"})
	if err == nil || !strings.Contains(err.Error(), "--nbd-allow") {
		t.Errorf("resume onto a host not allowed: %v", err)
	}
	if err := h.d.request(ctx, base, RequestResume, DeviceOp{}); err != nil {
		t.Fatal(err)
	}
	// The client first: closing both at once leaves the client's last
	// flush without a server until its timeout.
	if err := Detach(ctx, h.xs, ok); err != nil {
		t.Fatal(err)
	}
}

// TestImageDirsOnce: the allowed directories go to every worker and are
// resolved on every check, so a directory shared by many disks must be
// listed once, not once per disk.
func TestImageDirsOnce(t *testing.T) {
	d := &Daemon{
		opts:    Options{StateDir: "/run/blktap", ImageDirs: []string{"/srv/img", "/srv/img"}},
		desired: map[Key]config.Disk{},
	}
	for i := range 100 {
		dir := "/srv/img"
		if i%2 == 1 {
			dir = "/srv/other"
		}
		d.desired[Key{Kind: KindVBD3, Devid: uint32(i)}] = config.Disk{Format: "raw", Image: fmt.Sprintf("%s/d%d.img", dir, i)}
	}
	d.desired[Key{Kind: KindVBD3, Devid: 999}] = config.Disk{Format: "nbd", Image: "nbd+unix:///?socket=/srv/nbd/a.sock"}
	d.desiredDirs = fileDirs(d.desired)
	got := d.imageDirs()
	want := []string{"/run/blktap", "/srv/img", "/srv/other"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("imageDirs = %q, want %q", got, want)
	}
}
