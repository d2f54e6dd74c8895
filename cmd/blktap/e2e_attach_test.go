package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/oracle"
)

func (d *daemon) ls() []lsRow {
	d.t.Helper()
	out, err := d.blktap("ls", "--json")
	if err != nil {
		d.t.Fatal(err)
	}
	var rows []lsRow
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		d.t.Fatalf("ls --json: %v\n%s", err, out)
	}
	return rows
}

func (d *daemon) row(name string) (lsRow, bool) {
	for _, r := range d.ls() {
		if r.Name == name {
			return r, true
		}
	}
	return lsRow{}, false
}

// waitRow polls until cond holds for the named device.
func (d *daemon) waitRow(name string, what string, cond func(lsRow) bool) lsRow {
	d.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	var last lsRow
	for time.Now().Before(deadline) {
		if r, ok := d.row(name); ok {
			last = r
			if cond(r) {
				return r
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	d.t.Fatalf("%s: %s did not happen; last row %+v", name, what, last)
	return lsRow{}
}

// The old `xm block-attach 0`: attach prints the URI, a crashed worker is
// restarted without the other disk noticing, detach drains and removes.
func TestEndToEndAttachCrashDetach(t *testing.T) {
	qemuIO := oracle.Require(t, "qemu-io")
	nbdinfo := oracle.Require(t, "nbdinfo")
	bin, dir, d := idleDaemon(t)
	imgs := rawImages(t, bin, dir, "32M", "a.raw", "b.raw")
	a, b := imgs[0], imgs[1]
	uriA := d.attachURI("0", "aio:"+a, "xvdc", "w")
	uriB := d.attachURI("1", "aio:"+b, "xvdd", "w")
	for _, u := range []string{uriA, uriB} {
		runTool(t, qemuIO, "-f", "raw", u, "-c", "write -P 0x3c 0 1M")
	}
	rowA, _ := d.row("d0-xvdc")
	rowB, _ := d.row("d1-xvdd")
	if rowA.WorkerPid <= 0 || rowB.WorkerPid <= 0 || rowA.WorkerPid == rowB.WorkerPid {
		t.Fatalf("want one worker per disk: %+v %+v", rowA, rowB)
	}
	crashEachWorker(t, d, qemuIO, uriA, uriB)
	attachReadOnly(t, d, bin, dir, a, qemuIO, nbdinfo)
	for _, dv := range [][2]string{{"0", "xvdc"}, {"1", "xvdd"}, {"0", "xvde"}} {
		if _, err := d.blktap("detach", dv[0], dv[1]); err != nil {
			t.Fatal(err)
		}
	}
	if rows := d.ls(); len(rows) != 0 {
		t.Fatalf("devices left after detach: %+v", rows)
	}
	sock := strings.TrimPrefix(uriA, "nbd+unix:///?socket=")
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("export socket %s left after detach: %v", sock, err)
	}
	if _, err := d.blktap("detach", "0", "xvdc"); err == nil {
		t.Fatal("detaching a detached disk succeeded")
	}
}

// crashEachWorker crashes each worker in turn: it is restarted and serves
// the same URI again; the other disk's worker is untouched.
func crashEachWorker(t *testing.T, d *daemon, qemuIO, uriA, uriB string) {
	// again; the other disk's worker is untouched.
	for _, c := range []struct {
		name, uri, other string
	}{{"d0-xvdc", uriA, "d1-xvdd"}, {"d1-xvdd", uriB, "d0-xvdc"}} {
		before, _ := d.row(c.name)
		other, _ := d.row(c.other)
		if err := syscall.Kill(before.WorkerPid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		after := d.waitRow(c.name, "restart after SIGKILL", func(r lsRow) bool {
			return r.Phase == "connected" && r.WorkerPid > 0 && r.WorkerPid != before.WorkerPid
		})
		if o, _ := d.row(c.other); o.WorkerPid != other.WorkerPid || o.Phase != "connected" {
			t.Fatalf("%s noticed %s's crash: %+v", c.other, c.name, o)
		}
		out := runTool(t, qemuIO, "-f", "raw", c.uri, "-c", "read -P 0x3c 0 1M")
		if strings.Contains(out, "verification failed") {
			t.Fatalf("%s after restart: %s", c.name, out)
		}
		t.Logf("%s: worker %d killed, restarted as %d", c.name, before.WorkerPid, after.WorkerPid)
	}
	var restarts struct {
		Restarts int `json:"restarts"`
	}
	out, _ := d.blktap("ls", "--json")
	if !strings.Contains(out, `"restarts": 1`) {
		t.Fatalf("ls does not count the restarts:\n%s %v", out, restarts)
	}
}

// attachReadOnly: the seed's VM-config form, read-only. (On its own image:
// a read-only user of an image another disk writes is refused like a
// second writer.)
func attachReadOnly(t *testing.T, d *daemon, bin, dir, a, qemuIO, nbdinfo string) {
	c := filepath.Join(dir, "c.raw")
	if out, err := exec.Command(bin, "image", "create", "-f", "raw", c, "1M").CombinedOutput(); err != nil {
		t.Fatalf("image create: %v %s", err, out)
	}
	if _, err := d.blktap("attach", "0", "tap:aio:"+a+",xvde,r"); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("read-only attach of an image another disk writes: %v", err)
	}
	uriR := d.attachURI("0", "tap:aio:"+c+",xvde,r")
	out := runTool(t, nbdinfo, uriR)
	if !strings.Contains(out, "is_read_only: true") {
		t.Fatalf("r disk not read-only:\n%s", out)
	}
	if o, err := exec.Command(qemuIO, "-f", "raw", uriR, "-c", "write 0 4k").CombinedOutput(); err == nil && !strings.Contains(string(o), "failed") {
		t.Fatalf("write to a read-only disk succeeded: %s", o)
	}
}

// A toolstack drives the daemon with plain xenstore writes (Xen's own
// xenstore-write, as libxl would write them), under the 2006 backend/tap
// path; and a second writer of one image is refused with a clear error.
func TestEndToEndToolstackWrites(t *testing.T) {
	xsWrite := oracle.Require(t, "xenstore-write")
	xsRm := oracle.Require(t, "xenstore-rm")
	xsRead := oracle.Require(t, "xenstore-read")
	nbdinfo := oracle.Require(t, "nbdinfo")
	bin, dir, d := idleDaemon(t)
	img := filepath.Join(dir, "t.qcow")
	if out, err := exec.Command(bin, "image", "create", "-f", "qcow", img, "16M").CombinedOutput(); err != nil {
		t.Fatalf("image create: %v %s", err, out)
	}
	env := append(os.Environ(), "XENSTORED_PATH="+filepath.Join(d.stateDir, "xenstored.sock"))
	xs := func(tool string, args ...string) string {
		t.Helper()
		cmd := exec.Command(tool, args...)
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s %v: %v %s", tool, args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	be := "/local/domain/0/backend/tap/0/51744" // xvdc
	fe := "/local/domain/0/device/vbd/51744"
	xs(xsWrite,
		be+"/frontend", fe, be+"/frontend-id", "0", be+"/online", "1",
		be+"/params", "qcow:"+img, be+"/mode", "w", be+"/type", "tap", be+"/dev", "xvdc",
		fe+"/backend", be, fe+"/backend-id", "0", fe+"/virtual-device", "51744",
		fe+"/state", "1", be+"/state", "1")
	row := d.waitRow("d0-51744", "connect from toolstack writes", func(r lsRow) bool {
		return r.Phase == "connected" && r.Export != ""
	})
	if got := xs(xsRead, be+"/physical-device-path"); !strings.HasSuffix(row.Export, "socket="+got) {
		t.Fatalf("physical-device-path %q vs export %q", got, row.Export)
	}
	if out := runTool(t, nbdinfo, "--size", row.Export); strings.TrimSpace(out) != "16777216" {
		t.Fatalf("nbdinfo --size: %s", out)
	}

	secondWriterRefused(t, d, img)

	missingImageFails(t, d, dir, xs, xsWrite, xsRead, xsRm)

	// The toolstack detaches: online 0 and Closing, then waits for Closed.
	xs(xsWrite, be+"/online", "0", be+"/state", "5")
	d.waitRow("d0-51744", "close after toolstack detach", func(r lsRow) bool {
		return r.State == 6 && r.Phase == "closed" && r.WorkerPid == 0
	})
	xs(xsRm, be)
	xs(xsRm, fe)
	deadline := time.Now().Add(10 * time.Second)
	for len(d.ls()) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("device still listed after removal: %+v", d.ls())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// secondWriterRefused: the same image, writable, on a second device is
// refused, with a reason, and attach cleans up after itself.
func secondWriterRefused(t *testing.T, d *daemon, img string) {
	start := time.Now()
	out, err := d.blktap("attach", "0", "qcow:"+img, "xvdd", "w")
	if err == nil {
		t.Fatalf("second writable attach of one image succeeded: %s", out)
	}
	if !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second attach error lacks the reason: %v", err)
	}
	if time.Since(start) > 30*time.Second {
		t.Fatalf("refusal took %v", time.Since(start))
	}
	if _, ok := d.row("d0-xvdd"); ok {
		t.Fatal("refused attach left its device behind")
	}
}

// missingImageFails: a device whose image is missing fails terminally and
// says why in the backend's `error` key, as xenbus drivers do.
func missingImageFails(t *testing.T, d *daemon, dir string, xs func(tool string, args ...string) string, xsWrite, xsRead, xsRm string) {
	be2 := "/local/domain/0/backend/tap/0/51760" // xvdd
	fe2 := "/local/domain/0/device/vbd/51760"
	xs(xsWrite,
		be2+"/frontend", fe2, be2+"/frontend-id", "0", be2+"/online", "1",
		be2+"/params", "aio:"+filepath.Join(dir, "missing.raw"), be2+"/mode", "w",
		fe2+"/backend", be2, fe2+"/backend-id", "0", fe2+"/state", "1", be2+"/state", "1")
	d.waitRow("d0-51760", "terminal failure", func(r lsRow) bool { return r.Phase == "failed" })
	if msg := xs(xsRead, be2+"/error"); !strings.Contains(msg, "no such file") {
		t.Fatalf("backend error key: %q", msg)
	}
	xs(xsRm, be2)
	xs(xsRm, fe2)
}

// GitOps: the daemon follows edits of its YAML file (an editor's
// write-then-rename included); a broken file is reported and changes
// nothing.
func TestEndToEndYAMLEdits(t *testing.T) {
	oracle.Require(t, "nbdinfo")
	bin := buildBinary(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "disks.yaml")
	disk := func(name, dev string) string {
		return fmt.Sprintf("  - {name: %s, image: %s/%s.raw, format: raw, domain: 0, device: %s, create: {size: 8M}}\n", name, dir, name, dev)
	}
	write := func(body string) { t.Helper(); replaceFile(t, cfg, body) }
	write("disks:\n" + disk("one", "xvdb"))
	d := startDaemon(t, bin, cfg)
	d.waitConnected("one")

	write("disks:\n" + disk("one", "xvdb") + disk("two", "xvdc"))
	d.waitConnected("one", "two")

	// A broken file: the daemon must say it refused it, and then the
	// disks must be the ones it had, served by the same workers.
	before := d.ls()
	write("disks:\n  - {name: broken, image: /x, format: raw, device: xvdq, colour: blue}\n")
	d.waitRefused(`unknown key "colour"`)
	if after := d.ls(); !sameDisks(before, after) {
		t.Fatalf("a broken file changed the devices:\nbefore %+v\nafter  %+v", before, after)
	}

	write("disks:\n" + disk("two", "xvdc"))
	d.waitGone("one", "disk dropped from the file is still attached")
	if r, ok := d.row("two"); !ok || r.Phase != "connected" || r.WorkerPid != rowNamed(before, "two").WorkerPid {
		t.Fatalf("the remaining disk was disturbed: %+v, was %+v", r, rowNamed(before, "two"))
	}
	if msg := d.lsStderr(); msg != "" {
		t.Errorf("ls still reports a refusal after an accepted reload: %s", msg)
	}
}

// sameDisks: the same disks, connected as before, by the same workers.
func sameDisks(before, after []lsRow) bool {
	if len(before) != len(after) {
		return false
	}
	for _, b := range before {
		a := rowNamed(after, b.Name)
		if a.Name == "" || a.Phase != b.Phase || a.WorkerPid != b.WorkerPid || a.Export != b.Export {
			return false
		}
	}
	return true
}

func rowNamed(rows []lsRow, name string) lsRow {
	for _, r := range rows {
		if r.Name == name {
			return r
		}
	}
	return lsRow{}
}

// lsStderr is what `blktap ls` says on standard error: the daemon's
// refusal of its YAML file, if it refused the last version.
func (d *daemon) lsStderr() string {
	d.t.Helper()
	cmd := exec.Command(d.bin, "ls", "--state-dir", d.stateDir)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		d.t.Fatalf("ls: %v: %s", err, stderr.String())
	}
	return stderr.String()
}

// waitRefused waits for `blktap ls` to report that the daemon refused its
// YAML file, for a reason that mentions why.
func (d *daemon) waitRefused(why string) {
	d.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		msg := d.lsStderr()
		if strings.Contains(msg, "kept its previous desired state") && strings.Contains(msg, why) {
			return
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("ls never reported a refused reload mentioning %s; it says %q", why, msg)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// replaceFile replaces path's contents as an editor saves: write a
// temporary file, rename it over.
func replaceFile(t *testing.T, path, body string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// waitGone waits for the named disk to leave `blktap ls`.
func (d *daemon) waitGone(name, what string) {
	d.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, ok := d.row(name); !ok {
			return
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("%s: %+v", what, d.ls())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitAnswering waits for the daemon to answer the CLI.
func (d *daemon) waitAnswering() {
	d.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := d.blktap("ls"); err == nil {
			return
		}
		if time.Now().After(deadline) {
			d.t.Fatal("daemon never answered ls")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// attachURI attaches a disk and returns the NBD URI attach printed last.
func (d *daemon) attachURI(args ...string) string {
	d.t.Helper()
	out, err := d.blktap(append([]string{"attach"}, args...)...)
	if err != nil {
		d.t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	uri := lines[len(lines)-1]
	if !strings.HasPrefix(uri, "nbd+unix:///?socket=") {
		d.t.Fatalf("attach printed %q, want an NBD URI last", out)
	}
	return uri
}

// `attach 0 ... --nbd-device /dev/nbdN`: where the kernel has nbd, the
// disk becomes a dom0 block device holding the image's data; where it does
// not (as on CI machines, which load no nbd module), attach refuses at
// once with the reason and writes nothing.
func TestEndToEndKernelNBDDevice(t *testing.T) {
	qemuIO := oracle.Require(t, "qemu-io")
	bin := buildBinary(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "k.raw")
	if out, err := exec.Command(bin, "image", "create", "-f", "raw", img, "8M").CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	runTool(t, qemuIO, "-f", "raw", img, "-c", "write -P 0x6b 0 1M")
	d := startDaemon(t, bin, "")
	d.waitAnswering()
	if _, err := os.Stat("/dev/nbd0"); err != nil {
		_, err := d.blktap("attach", "0", "aio:"+img, "xvdc", "w", "--nbd-device", "/dev/nbd0")
		if err == nil || !strings.Contains(err.Error(), "modprobe nbd") {
			t.Fatalf("attach --nbd-device without an nbd module: %v", err)
		}
		if rows := d.ls(); len(rows) != 0 {
			t.Fatalf("a refused attach left devices: %+v", rows)
		}
		t.Skip("no /dev/nbd0 here (the kernel's nbd module is not loaded); the refusal was checked")
	}
	d.attachURI("0", "aio:"+img, "xvdc", "w", "--nbd-device", "/dev/nbd0")
	b := make([]byte, 1<<20)
	f, err := os.Open("/dev/nbd0")
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.ReadAt(b, 0)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	for i, c := range b {
		if c != 0x6b {
			t.Fatalf("/dev/nbd0 byte %d = %#x, want 0x6b", i, c)
		}
	}
	if _, err := d.blktap("detach", "0", "xvdc"); err != nil {
		t.Fatal(err)
	}
}

// Trust: an image outside the allowed image directories is refused, even
// when a toolstack names it (docs/ARCHITECTURE.md, "Trust": a
// tenant's image naming /etc/shadow must never be served).
func TestEndToEndImageDirs(t *testing.T) {
	_, _, d := idleDaemon(t)
	_, err := d.blktap("attach", "0", "aio:/etc/passwd", "xvdc", "r")
	if err == nil || !strings.Contains(err.Error(), "outside the allowed image directories") {
		t.Fatalf("attach of /etc/passwd: %v", err)
	}
	if rows := d.ls(); len(rows) != 0 {
		t.Fatalf("refused attach left devices: %+v", rows)
	}
}

// A disk declared twice (attached by hand, then named differently in the
// YAML) is an error on the device's status, not a crash and not a
// reconnect: the first declaration goes on serving.
func TestEndToEndDeclaredTwice(t *testing.T) {
	bin := buildBinary(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "disks.yaml")
	if err := os.WriteFile(cfg, []byte("disks: []\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, bin, cfg)
	d.waitAnswering()
	img := filepath.Join(dir, "attached.raw")
	if out, err := exec.Command(bin, "image", "create", "-f", "raw", img, "8M").CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	d.attachURI("0", "aio:"+img, "xvdc", "w")
	before, _ := d.row("d0-xvdc")
	yaml := fmt.Sprintf("disks:\n  - {name: other, image: %s/other.raw, format: raw, device: xvdc, create: {size: 8M}}\n", dir)
	if err := os.WriteFile(cfg+".tmp", []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(cfg+".tmp", cfg); err != nil {
		t.Fatal(err)
	}
	r := d.waitRow("d0-xvdc", "conflict reported", func(r lsRow) bool { return strings.Contains(r.Error, "declared twice") })
	if r.Phase != "connected" || r.WorkerPid != before.WorkerPid {
		t.Fatalf("the first declaration was disturbed: %+v (before %+v)", r, before)
	}
	// Dropping the YAML's claim clears the error and detaches nothing.
	if err := os.WriteFile(cfg+".tmp", []byte("disks: []\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(cfg+".tmp", cfg); err != nil {
		t.Fatal(err)
	}
	r = d.waitRow("d0-xvdc", "conflict cleared", func(r lsRow) bool { return r.Error == "" })
	if r.Phase != "connected" || r.WorkerPid != before.WorkerPid {
		t.Fatalf("dropping the YAML's claim disturbed the device: %+v", r)
	}
}
