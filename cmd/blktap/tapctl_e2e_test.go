package main

// End-to-end: Xen's stock hotplug script for tap disks (Debian trixie's
// /etc/xen/scripts/block-tap, Xen 4.20), run unchanged against the daemon
// with our tap-ctl link first in PATH, on a vbd3 device written as libxl
// 4.20 writes it (docs/WIRE.md, sections "Toolstack keys" and "Real Xen hosts"). The script is downloaded at test
// time by scripts/fetch-xen-hotplug.sh, never committed.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/oracle"
	"github.com/blktap-go/blktap/xenstore"
)

// xenHotplugScripts returns a directory holding Debian trixie's Xen
// hotplug scripts: $BLKTAP_XEN_SCRIPTS, else the user cache the fetch
// script fills, fetching it when empty. Without the scripts the test
// skips, and fails under CI.
func xenHotplugScripts(t *testing.T) string {
	t.Helper()
	missing := func(format string, args ...any) {
		t.Helper()
		msg := fmt.Sprintf(format, args...) + " (scripts/fetch-xen-hotplug.sh fetches them)"
		if oracle.InCI() {
			t.Fatal(msg + ": required under CI")
		}
		t.Skip(msg)
	}
	dir := os.Getenv("BLKTAP_XEN_SCRIPTS")
	if dir == "" {
		cache, err := os.UserCacheDir()
		if err != nil {
			missing("no cache directory: %v", err)
		}
		dir = filepath.Join(cache, "blktap-go", "xen-scripts-trixie")
	}
	if _, err := os.Stat(filepath.Join(dir, "block-tap")); err != nil {
		_, self, _, _ := runtime.Caller(0)
		fetch := filepath.Join(filepath.Dir(self), "..", "..", "scripts", "fetch-xen-hotplug.sh")
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		out, err := exec.CommandContext(ctx, fetch, dir).CombinedOutput()
		if err != nil {
			missing("Xen hotplug scripts not in %s and the download failed: %v\n%s", dir, err, out)
		}
	}
	for _, f := range []string{"block-tap", "block-common.sh", "xen-hotplug-common.sh", "locking.sh", "logging.sh", "hotplugpath.sh", "xen-script-common.sh"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			missing("%s missing from %s", f, dir)
		}
	}
	return dir
}

// hotplugLog is where xen-hotplug-common.sh sends every script's stderr:
// the hotplug scripts hard-code it, so the test reads it there.
const hotplugLog = "/var/log/xen/xen-hotplug.log"

type blockTapRig struct {
	t       *testing.T
	d       *daemon
	xs      *xenstore.Client
	scripts string
	tapCtl  string
	env     []string
}

func newBlockTapRig(t *testing.T) *blockTapRig {
	t.Helper()
	if os.Geteuid() != 0 {
		// The stock scripts lock under /var/run/xen-hotplug and log to
		// /var/log/xen; tap-ctl links under /run/blktap-control.
		if oracle.InCI() {
			t.Fatal("the block-tap tests need root: required under CI")
		}
		t.Skip("the block-tap tests need root (the stock scripts write /var/run/xen-hotplug and /var/log/xen)")
	}
	for _, p := range []string{"bash", "xenstore-read", "xenstore-write", "xenstore-list", "flock", "logger"} {
		oracle.Require(t, p)
	}
	scripts := xenHotplugScripts(t)
	bin := buildBinary(t)
	links := t.TempDir()
	if err := os.Symlink(bin, filepath.Join(links, "tap-ctl")); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(hotplugLog), 0o755); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, bin, "")
	sock, xs := d.dialXenstore()
	env := []string{
		"PATH=" + links + ":" + os.Getenv("PATH"),
		"XENSTORED_PATH=" + sock,
		"BLKTAP_STATE_DIR=" + d.stateDir,
		"HOME=" + os.Getenv("HOME"),
	}
	return &blockTapRig{t: t, d: d, xs: xs, scripts: scripts, tapCtl: filepath.Join(links, "tap-ctl"), env: env}
}

// writeDisk declares a tap disk as libxl 4.20's device_disk_add does for
// backendtype=tap, in one transaction, and names the guest's VM.
func (r *blockTapRig) writeDisk(domid, devid int, vdev, params string) (be, fe string) {
	r.t.Helper()
	return writeTapDisk(r.t, r.xs, domid, devid, vdev, params)
}

func writeTapDisk(t *testing.T, xs *xenstore.Client, domid, devid int, vdev, params string) (be, fe string) {
	t.Helper()
	be = fmt.Sprintf("/local/domain/0/backend/vbd3/%d/%d", domid, devid)
	fe = fmt.Sprintf("/local/domain/%d/device/vbd/%d", domid, devid)
	dom, dev := strconv.Itoa(domid), strconv.Itoa(devid)
	keys := [][2]string{
		{be + "/frontend", fe}, {be + "/frontend-id", dom}, {be + "/online", "1"},
		{be + "/removable", "0"}, {be + "/bootable", "1"}, {be + "/state", "1"},
		{be + "/dev", vdev}, {be + "/type", "vbd3"}, {be + "/mode", "w"},
		{be + "/device-type", "disk"}, {be + "/discard-enable", "0"},
		{be + "/specification", "xen"}, {be + "/params", params},
		{be + "/script", "/etc/xen/scripts/block-tap"},
		{fe + "/backend", be}, {fe + "/backend-id", "0"}, {fe + "/state", "1"},
		{fe + "/virtual-device", dev}, {fe + "/device-type", "disk"}, {fe + "/trusted", "1"},
		{fe + "/protocol", "x86_64-abi"},
	}
	if domid != 0 {
		keys = append(keys, [2]string{fmt.Sprintf("/local/domain/%d/vm", domid), "/vm/00000000-0000-0000-0000-00000000000" + dom})
	}
	ctx := context.Background()
	err := xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		for _, kv := range keys {
			if err := tx.Write(ctx, kv[0], kv[1]); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return be, fe
}

func (r *blockTapRig) read(p string) string {
	v, _ := r.xs.Read(context.Background(), p)
	return v
}

// waitKey polls until the key holds one of want, as libxl waits for the
// backend's state.
func (r *blockTapRig) waitKey(p string, want ...string) {
	r.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		v := r.read(p)
		for _, w := range want {
			if v == w {
				return
			}
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("%s is %q, want one of %q", p, v, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// blockTap runs the stock script as libxl 4.20 does: argv[0] its path,
// the action, and libxl's environment (libxl_linux.c get_hotplug_env).
// It returns the exit error and what the script logged meanwhile.
func (r *blockTapRig) blockTap(action string, domid, devid int) (string, error) {
	r.t.Helper()
	var off int64
	if fi, err := os.Stat(hotplugLog); err == nil {
		off = fi.Size()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	script := filepath.Join(r.scripts, "block-tap")
	cmd := exec.CommandContext(ctx, script, action) // #!/bin/bash -e
	cmd.Env = append(r.env,
		"script=/etc/xen/scripts/block-tap",
		"XENBUS_TYPE=vbd3",
		fmt.Sprintf("XENBUS_PATH=backend/vbd3/%d/%d", domid, devid),
		"XENBUS_BASE_PATH=backend")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	logged := out.String()
	if f, ferr := os.Open(hotplugLog); ferr == nil {
		f.Seek(off, io.SeekStart)
		b, _ := io.ReadAll(f)
		f.Close()
		logged += string(b)
	}
	return logged, err
}

func TestBlockTapAddRemove(t *testing.T) {
	nbdinfo := oracle.Require(t, "nbdinfo")
	r := newBlockTapRig(t)
	img := filepath.Join(t.TempDir(), "guest.raw")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 64<<20); err != nil {
		t.Fatal(err)
	}

	// A guest's disk: libxl waits for InitWait, then runs the script.
	const domid, devid = 1, 51712 // xvda
	be, fe := r.writeDisk(domid, devid, "xvda", "aio:"+img)
	r.waitKey(be+"/state", "2", "3", "4")
	logged, err := r.blockTap("add", domid, devid)
	if err != nil {
		t.Fatalf("block-tap add: %v\n%s", err, logged)
	}
	if got := r.read(be + "/hotplug-status"); got != "connected" {
		t.Fatalf("hotplug-status %q (hotplug-error %q)\n%s", got, r.read(be+"/hotplug-error"), logged)
	}
	pid, minor := r.read(be+"/pid"), r.read(be+"/minor")
	if want := r.read(be + "/blktap/worker-pid"); pid != want || pid == "" {
		t.Fatalf("pid %q, the daemon's worker is %q", pid, want)
	}
	if want := strconv.Itoa(domid<<29 | devid); minor != want {
		t.Fatalf("minor %q, want %s", minor, want)
	}
	if got, want := r.read(be+"/physical-device-path"), "/run/blktap-control/nbd"+pid+"."+minor; got != want {
		t.Fatalf("physical-device-path %q, want %q", got, want)
	}
	// Our tap-ctl lists the disk as block-tap's find_device parses it.
	list := exec.Command(r.tapCtl, "list", "-t", "aio", "-f", img)
	list.Env = r.env
	out, err := list.Output()
	if want := fmt.Sprintf("pid=%s minor=%s state=0 args=aio:%s\n", pid, minor, img); err != nil || string(out) != want {
		t.Fatalf("tap-ctl list: %v: %q, want %q", err, out, want)
	}

	// The toolstack unplugs: online 0 and Closing, waits for Closed, runs
	// the script's remove, then removes both directories.
	ctx := context.Background()
	r.xs.Write(ctx, be+"/online", "0")
	r.xs.Write(ctx, be+"/state", "5")
	r.waitKey(be+"/state", "6")
	if logged, err := r.blockTap("remove", domid, devid); err != nil {
		t.Fatalf("block-tap remove: %v\n%s", err, logged)
	}
	if got := r.read(be + "/blktap/worker-pid"); got != "" {
		t.Fatalf("worker %s still runs after remove", got)
	}
	r.xs.Rm(ctx, be)
	r.xs.Rm(ctx, fe)

	blockTapDom0(t, r, nbdinfo)
}

// blockTapDom0: for domain 0's disk (pygrub's local attach) the daemon
// serves an NBD export, and the physical-device-path block-tap writes
// reaches it.
func blockTapDom0(t *testing.T, r *blockTapRig, nbdinfo string) {
	ctx := context.Background()
	img0 := filepath.Join(t.TempDir(), "dom0.raw")
	if err := os.WriteFile(img0, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img0, 32<<20); err != nil {
		t.Fatal(err)
	}
	be0, fe0 := r.writeDisk(0, 51728, "xvdb", "aio:"+img0)
	r.waitKey(be0+"/state", "2", "4")
	if logged, err := r.blockTap("add", 0, 51728); err != nil {
		t.Fatalf("block-tap add (domain 0): %v\n%s", err, logged)
	}
	path := r.read(be0 + "/physical-device-path")
	if !strings.HasPrefix(path, "/run/blktap-control/nbd") {
		t.Fatalf("physical-device-path %q", path)
	}
	if out := runTool(t, nbdinfo, "--size", "nbd+unix:///?socket="+path); strings.TrimSpace(out) != strconv.Itoa(32<<20) {
		t.Fatalf("nbdinfo --size through %s: %s", path, out)
	}
	r.xs.Write(ctx, be0+"/online", "0")
	r.xs.Write(ctx, be0+"/state", "5")
	r.waitKey(be0+"/state", "6")
	if logged, err := r.blockTap("remove", 0, 51728); err != nil {
		t.Fatalf("block-tap remove (domain 0): %v\n%s", err, logged)
	}
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Fatalf("%s left after remove: %v", path, err)
	}
	r.xs.Rm(ctx, be0)
	r.xs.Rm(ctx, fe0)
}

// A disk whose image is missing: block-tap add fails, and the daemon's
// reason reaches the hotplug log through tap-ctl open.
func TestBlockTapAddMissingImage(t *testing.T) {
	r := newBlockTapRig(t)
	img := filepath.Join(t.TempDir(), "missing.raw")
	const domid, devid = 2, 51712
	be, fe := r.writeDisk(domid, devid, "xvda", "aio:"+img)
	r.waitKey(be+"/blktap/phase", "failed")
	reason := r.read(be + "/blktap/error")
	if !strings.Contains(reason, "no such file") {
		t.Fatalf("daemon's error %q", reason)
	}
	logged, err := r.blockTap("add", domid, devid)
	if err == nil {
		t.Fatalf("block-tap add succeeded on a missing image\n%s", logged)
	}
	if got := r.read(be + "/hotplug-status"); got != "error" {
		t.Fatalf("hotplug-status %q", got)
	}
	if got := r.read(be + "/hotplug-error"); !strings.Contains(got, img) {
		t.Fatalf("hotplug-error %q does not name the image", got)
	}
	if !strings.Contains(logged, "tap-ctl: open: ") || !strings.Contains(logged, reason) {
		t.Fatalf("the hotplug log lacks tap-ctl's report of %q:\n%s", reason, logged)
	}
	ctx := context.Background()
	r.xs.Rm(ctx, be)
	r.xs.Rm(ctx, fe)
}
