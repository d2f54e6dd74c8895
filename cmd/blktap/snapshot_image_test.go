package main

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/internal/oracle"
)

// `image snapshot` against qemu-img snapshot: the same list text, and
// each side applies and deletes what the other made, with qemu-img check
// clean after every step and qemu-io reading the reverted data.
func TestImageSnapshotAgainstQemu(t *testing.T) {
	bin := imageBinary(t)
	qimg, qio := oracle.Require(t, "qemu-img"), oracle.Require(t, "qemu-io")
	dir := t.TempDir()
	img := filepath.Join(dir, "d.qcow2")
	mustRun(t, dir, qimg, "create", "-f", "qcow2", img, "4M")
	mustRun(t, dir, qio, "-f", "qcow2", "-c", "write -P 0x5a 0 1M", img)
	step := func(args ...string) {
		t.Helper()
		mustRun(t, dir, bin, append([]string{"image", "snapshot"}, args...)...)
		if so, se, rc := runIn(t, dir, qimg, "check", img); rc != 0 {
			t.Fatalf("qemu-img check after %v: exit %d\n%s%s", args, rc, so, se)
		}
	}
	step("-c", "ours", img)
	mustRun(t, dir, qimg, "snapshot", "-c", "theirs-with-a-tag-wider-than-its-column", img)
	mustRun(t, dir, qio, "-f", "qcow2", "-c", "write -P 0x6b 512k 1M", img)
	want, _, _ := runIn(t, dir, qimg, "snapshot", "-l", img)
	got, _, _ := runIn(t, dir, bin, "image", "snapshot", "-l", img)
	if got != want || !strings.Contains(got, " ours ") || !strings.Contains(got, " theirs-with-a-tag-wider-than-its-column ") {
		t.Fatalf("snapshot -l:\nours:\n%s\nqemu-img:\n%s", got, want)
	}
	step("-a", "theirs-with-a-tag-wider-than-its-column", img)
	readPattern(t, dir, qio, img, "0x5a", "0 1M")
	step("-d", "theirs-with-a-tag-wider-than-its-column", img)
	mustRun(t, dir, qimg, "snapshot", "-a", "1", img) // "ours", by ID
	readPattern(t, dir, qio, img, "0x5a", "0 1M")
	step("-d", "ours", img)
	if so, _, _ := runIn(t, dir, qimg, "snapshot", "-l", img); so != "" {
		t.Fatalf("snapshots left after deleting both:\n%s", so)
	}
	readPattern(t, dir, qio, img, "0", "1M 3M")
}

func readPattern(t *testing.T, dir, qio, img, pattern, span string) {
	t.Helper()
	so, se, rc := runIn(t, dir, qio, "-f", "qcow2", "-c", "read -P "+pattern+" "+span, img)
	if rc != 0 || strings.Contains(so+se, "Pattern verification failed") {
		t.Fatalf("qemu-io read -P %s %s: exit %d\n%s%s", pattern, span, rc, so, se)
	}
}

// While a worker has the image open (formats.Open takes qemu's locks, as
// the worker's open does) nothing changes it; bad command lines and other
// formats are refused with a reason.
func TestImageSnapshotRefusals(t *testing.T) {
	bin := imageBinary(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "busy.qcow2")
	mustRun(t, dir, bin, "image", "create", "-f", "qcow2", img, "1M")
	held, err := formats.Open("qcow2", img, formats.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"-c", "x"}, {"-a", "x"}, {"-d", "x"}, {"-l"}} {
		_, se, rc := runIn(t, dir, bin, append(append([]string{"image", "snapshot"}, args...), img)...)
		if rc != 1 || !strings.Contains(se, "in use by another process") {
			t.Fatalf("snapshot %v of an image a worker holds: exit %d\n%s", args, rc, se)
		}
	}
	if err := held.Close(); err != nil {
		t.Fatal(err)
	}
	if _, se, rc := runIn(t, dir, bin, "image", "snapshot", "-l", "-c", "x", img); rc != 2 || !strings.Contains(se, "do not mix") {
		t.Fatalf("-l with -c: exit %d\n%s", rc, se)
	}
	if _, se, rc := runIn(t, dir, bin, "image", "snapshot", "-a", "nosuch", img); rc != 1 || !strings.Contains(se, "snapshot not found") {
		t.Fatalf("-a of a missing snapshot: exit %d\n%s", rc, se)
	}
	raw := filepath.Join(dir, "r.raw")
	mustRun(t, dir, bin, "image", "create", "-f", "raw", raw, "1M")
	if _, se, rc := runIn(t, dir, bin, "image", "snapshot", "-c", "x", raw); rc != 1 || !strings.Contains(se, "no internal snapshots") {
		t.Fatalf("snapshot of a raw image: exit %d\n%s", rc, se)
	}
}

// With a real worker serving the image (`attach`), `image snapshot`
// refuses it; once detached, the snapshot is made and qemu-img finds the
// image clean.
func TestEndToEndImageSnapshotRefusedWhileAttached(t *testing.T) {
	qimg := oracle.Require(t, "qemu-img")
	bin := buildBinary(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "live.qcow2")
	mustRun(t, dir, bin, "image", "create", "-f", "qcow2", img, "16M")
	d := startDaemon(t, bin, "")
	d.waitAnswering()
	d.attachURI("0", "qcow2:"+img, "xvdd", "w")
	_, se, rc := runIn(t, dir, bin, "image", "snapshot", "-c", "while-served", img)
	if rc != 1 || !strings.Contains(se, "in use by another process") {
		t.Fatalf("snapshot of an attached image: exit %d\n%s", rc, se)
	}
	if _, err := d.blktap("detach", "0", "xvdd"); err != nil {
		t.Fatal(err)
	}
	d.waitGone("d0-xvdd", "disk still listed after detach")
	// The worker may still be closing the image when its row goes.
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		_, se, rc := runIn(t, dir, bin, "image", "snapshot", "-c", "after", img)
		if rc == 0 {
			break
		}
		if !strings.Contains(se, "in use") || time.Now().After(deadline) {
			t.Fatalf("snapshot after detach: exit %d\n%s", rc, se)
		}
	}
	if so, se, rc := runIn(t, dir, qimg, "check", img); rc != 0 {
		t.Fatalf("qemu-img check: exit %d\n%s%s", rc, so, se)
	}
	if so, _, _ := runIn(t, dir, qimg, "snapshot", "-l", img); !strings.Contains(so, " after ") || strings.Contains(so, "while-served") {
		t.Fatalf("qemu-img snapshot -l:\n%s", so)
	}
}
