//go:build rbd

package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/internal/cephdev"
	"github.com/blktap-go/blktap/internal/oracle"
)

// TestEndToEndRBDSnapshot: `blktap snapshot` on a live rbd disk makes a
// protected RBD snapshot and a clone of it, and moves the disk onto the
// clone, as an overlay file takes a file disk's writes. The rbd tool is the
// oracle: it lists the snapshot (protected) and the clone as its child,
// and exports what each holds. A snapshot that fails leaves nothing behind
// and the disk serving its old image.
func TestEndToEndRBDSnapshot(t *testing.T) {
	c, qemuIO, bin, name, spec := rbdTest(t, "-s1-s2")
	yaml := filepath.Join(t.TempDir(), "disks.yaml")
	os.WriteFile(yaml, []byte(fmt.Sprintf("disks:\n  - {name: vm1, format: rbd, image: %q, domain: 0, device: xvdb, create: {size: 16M}}\n", spec)), 0o644)
	d := startDaemon(t, bin, yaml)
	row := d.waitConnected("vm1")["vm1"]
	runTool(t, qemuIO, "-f", "raw", "-c", "write -P 0x61 0 1M", row.Export)

	if out, err := d.blktap("snapshot", "0", "xvdb", "s1"); err != nil {
		t.Fatalf("snapshot: %v %s", err, out)
	}
	row = d.waitConnected("vm1")["vm1"]
	if !strings.Contains(row.Image, "rbd/"+name+"-s1") {
		t.Fatalf("after the snapshot the disk serves %q, want the clone rbd/%s-s1", row.Image, name)
	}
	runTool(t, qemuIO, "-f", "raw", "-c", "write -P 0x62 0 64k", row.Export)

	snaps := rbdSnaps(t, c, "rbd/"+name)
	if len(snaps) != 1 || snaps[0].Name != "s1" || snaps[0].Protected != "true" {
		t.Fatalf("rbd snap ls rbd/%s: %+v, want one protected snapshot s1", name, snaps)
	}
	if kids := strings.TrimSpace(c.RBD(t, "children", "rbd/"+name+"@s1")); kids != "rbd/"+name+"-s1" {
		t.Fatalf("rbd children rbd/%s@s1: %q", name, kids)
	}
	// The snapshot and the parent's head hold the data from before; the
	// clone has the write after it over them.
	before := bytes.Repeat([]byte{0x61}, 1<<20)
	after := append(bytes.Repeat([]byte{0x62}, 64<<10), before[64<<10:]...)
	for img, want := range map[string][]byte{"rbd/" + name + "@s1": before, "rbd/" + name: before, "rbd/" + name + "-s1": after} {
		if got := rbdExport(t, c, img)[:1<<20]; !bytes.Equal(got, want) {
			t.Errorf("rbd export %s: the first MiB is not what was written", img)
		}
	}

	// Refused before any pause: another format's overlay, a bad name.
	for _, args := range [][]string{{"s2", "-f", "qcow2"}, {"a/b"}} {
		if out, err := d.blktap(append([]string{"snapshot", "0", "xvdb"}, args...)...); err == nil {
			t.Errorf("snapshot %v on an rbd disk succeeded: %s", args, out)
		}
	}
	// A clone name that is taken: the snapshot is removed again and the
	// disk resumes on its image.
	c.RBD(t, "create", "--size", "1M", "rbd/"+name+"-s1-s2")
	if out, err := d.blktap("snapshot", "0", "xvdb", "s2"); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Fatalf("snapshot onto a taken clone name: %v %s", err, out)
	}
	if snaps := rbdSnaps(t, c, "rbd/"+name+"-s1"); len(snaps) != 0 {
		t.Errorf("a failed snapshot left %+v behind", snaps)
	}
	row = d.waitConnected("vm1")["vm1"]
	runTool(t, qemuIO, "-f", "raw", "-c", "read -P 0x62 0 64k", "-c", "write -P 0x63 64k 4k", row.Export)

	// A clone named in full, its snapshot named after it.
	if out, err := d.blktap("snapshot", "0", "xvdb", "rbd:rbd/other-"+name); err != nil {
		t.Fatalf("snapshot to a named clone: %v %s", err, out)
	}
	row = d.waitConnected("vm1")["vm1"]
	if !strings.Contains(row.Image, "rbd/other-"+name) {
		t.Fatalf("disk serves %q, want rbd/other-%s", row.Image, name)
	}
	if kids := strings.TrimSpace(c.RBD(t, "children", "rbd/"+name+"-s1@other-"+name)); kids != "rbd/other-"+name {
		t.Fatalf("rbd children of the second snapshot: %q", kids)
	}
	out := runTool(t, qemuIO, "-f", "raw", "-c", "read -P 0x62 0 64k", "-c", "read -P 0x63 64k 4k", "-c", "read -P 0x61 68k 956k", row.Export)
	if strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("the second clone reads other data:\n%s", out)
	}
}

// rbdTest is what an rbd end-to-end test starts from: the cluster,
// qemu-io, an rbd-enabled blktap, and a fresh image name (and its spec)
// whose tree, and the images NAME+suffix, are removed at the end.
func rbdTest(t *testing.T, suffixes ...string) (c *cephdev.Cluster, qemuIO, bin, name, spec string) {
	c = cephdev.Get(t)
	qemuIO = oracle.Require(t, "qemu-io")
	bin = buildRBDBinary(t)
	name, spec = c.Name(t)
	var extra []string
	for _, s := range suffixes {
		extra = append(extra, name+s)
	}
	t.Cleanup(func() { removeRBDTree(c.Conf, "rbd/"+name, extra...) })
	return c, qemuIO, bin, name, spec
}

type rbdSnap struct {
	Name      string `json:"name"`
	Protected string `json:"protected"`
}

func rbdSnaps(t *testing.T, c *cephdev.Cluster, img string) []rbdSnap {
	t.Helper()
	var snaps []rbdSnap
	if err := json.Unmarshal([]byte(c.RBD(t, "snap", "ls", "--format", "json", img)), &snaps); err != nil {
		t.Fatal(err)
	}
	return snaps
}

func rbdExport(t *testing.T, c *cephdev.Cluster, img string) []byte {
	t.Helper()
	f := filepath.Join(t.TempDir(), "export")
	c.RBD(t, "export", "--no-progress", img, f)
	b, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// removeRBDTree removes a test's images, children before parents: a
// parent with a protected snapshot cannot go while a clone of it exists.
func removeRBDTree(conf, root string, extra ...string) {
	rbd := func(args ...string) string {
		out, _ := exec.Command("rbd", append([]string{"-c", conf}, args...)...).Output()
		return string(out)
	}
	for _, img := range extra {
		rbd("rm", "--no-progress", "rbd/"+img)
	}
	var walk func(img string)
	walk = func(img string) {
		var snaps []rbdSnap
		json.Unmarshal([]byte(rbd("snap", "ls", "--format", "json", img)), &snaps)
		for _, s := range snaps {
			for _, kid := range strings.Fields(rbd("children", img+"@"+s.Name)) {
				walk(kid)
			}
			rbd("snap", "unprotect", img+"@"+s.Name)
		}
		rbd("snap", "purge", "--no-progress", img)
		rbd("rm", "--no-progress", img)
	}
	walk(root)
}
