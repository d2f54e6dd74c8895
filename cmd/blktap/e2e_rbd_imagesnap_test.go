//go:build rbd

package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/internal/oracle"
)

// TestEndToEndRBDImageSnapshot: `image snapshot -l/-c/-a/-d` on an rbd:
// image are RBD snapshots, with the rbd tool and qemu-img (its rbd driver)
// as oracles: -l prints what qemu-img snapshot -l prints, -c on a served
// disk takes a snapshot rbd snap ls shows holding what was acknowledged,
// -a is refused while a worker holds the image and after a pause leaves
// the head equal to the snapshot (what rbd snap rollback leaves), -d
// removes it.
func TestEndToEndRBDImageSnapshot(t *testing.T) {
	c, qemuIO, bin, name, spec := rbdTest(t)
	qemuImg := oracle.Require(t, "qemu-img")
	yaml := filepath.Join(t.TempDir(), "disks.yaml")
	os.WriteFile(yaml, []byte(fmt.Sprintf("disks:\n  - {name: vm1, format: rbd, image: %q, domain: 0, device: xvdb, create: {size: 16M}}\n", spec)), 0o644)
	d := startDaemon(t, bin, yaml)
	row := d.waitConnected("vm1")["vm1"]
	img := "rbd:" + spec
	snapshot := func(args ...string) (string, error) {
		out, err := exec.Command(bin, append([]string{"image", "snapshot"}, args...)...).CombinedOutput()
		return string(out), err
	}
	if out, err := snapshot("-l", img); err != nil || out != "" {
		t.Fatalf("-l with no snapshots: %v %q", err, out)
	}
	runTool(t, qemuIO, "-f", "raw", "-c", "write -P 0x61 0 1M", row.Export)
	// While the worker writes the image: librbd has the holder take it.
	for _, s := range []string{"s1", "s2"} {
		if out, err := snapshot("-c", s, img); err != nil {
			t.Fatalf("-c %s on a served image: %v %s", s, err, out)
		}
	}
	if out, err := snapshot("-c", "s1", img); err == nil || !strings.Contains(out, "could not create snapshot 's1'") {
		t.Errorf("-c of a taken name: %v %s", err, out)
	}
	if snaps := rbdSnaps(t, c, "rbd/"+name); len(snaps) != 2 || snaps[0].Name != "s1" || snaps[1].Name != "s2" {
		t.Fatalf("rbd snap ls: %+v, want s1 and s2", snaps)
	}
	before := bytes.Repeat([]byte{0x61}, 1<<20)
	if !bytes.Equal(rbdExport(t, c, "rbd/"+name+"@s1")[:1<<20], before) {
		t.Fatal("rbd export @s1 lacks the write acknowledged before the snapshot")
	}
	ours, err := snapshot("-l", img)
	if want := runTool(t, qemuImg, "snapshot", "-l", img); err != nil || ours != want {
		t.Errorf("-l printed\n%s(%v), qemu-img snapshot -l prints\n%s", ours, err, want)
	}
	runTool(t, qemuIO, "-f", "raw", "-c", "write -P 0x62 0 1M", row.Export)

	if out, err := snapshot("-a", "s1", img); err == nil || !strings.Contains(out, "locked by") || !strings.Contains(out, "pause or detach") {
		t.Fatalf("-a on an image a worker holds: %v %s, want a refusal naming the holder", err, out)
	}
	if out := runTool(t, qemuIO, "-f", "raw", "-c", "read -P 0x62 0 1M", row.Export); strings.Contains(out, "verification failed") {
		t.Fatalf("a refused -a changed the disk:\n%s", out)
	}
	if out, err := d.blktap("pause", "0", "xvdb"); err != nil {
		t.Fatalf("pause: %v %s", err, out)
	}
	if out, err := snapshot("-a", "nope", img); err == nil || !strings.Contains(out, "no such snapshot") {
		t.Errorf("-a of a missing snapshot: %v %s", err, out)
	}
	if out, err := snapshot("-a", "s1", img); err != nil {
		t.Fatalf("-a s1 on the paused disk: %v %s", err, out)
	}
	if head, snap := rbdExport(t, c, "rbd/"+name), rbdExport(t, c, "rbd/"+name+"@s1"); !bytes.Equal(head, snap) || !bytes.Equal(head[:1<<20], before) {
		t.Fatal("after -a s1 the head is not what rbd export @s1 holds")
	}
	if out, err := d.blktap("resume", "0", "xvdb"); err != nil {
		t.Fatalf("resume: %v %s", err, out)
	}
	row = d.waitConnected("vm1")["vm1"]
	if out := runTool(t, qemuIO, "-f", "raw", "-c", "read -P 0x61 0 1M", row.Export); strings.Contains(out, "verification failed") {
		t.Fatalf("the resumed disk does not read the snapshot's data:\n%s", out)
	}

	if out, err := snapshot("-d", "s1", img); err != nil {
		t.Fatalf("-d s1: %v %s", err, out)
	}
	if snaps := rbdSnaps(t, c, "rbd/"+name); len(snaps) != 1 || snaps[0].Name != "s2" {
		t.Errorf("rbd snap ls after -d s1: %+v, want s2 alone", snaps)
	}
	stopDaemon(t, bin, d.stateDir, d.cmd, d.done)
}
