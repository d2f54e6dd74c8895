//go:build rbd

package rbd

import (
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestSnapshotsAsRBDSeesThem: snapshots we take, list and delete are the
// ones `rbd snap ls` shows, and the reverse; a protected snapshot with a
// clone is not deleted; an image a writer holds is snapshotted through
// the holder, which keeps writing.
func TestSnapshotsAsRBDSeesThem(t *testing.T) {
	c, name, spec := newImage(t, 4<<20)
	t.Cleanup(func() { removeSnaps(c.Conf, name) })
	if err := CreateSnapshot(spec, "ours"); err != nil {
		t.Fatal(err)
	}
	c.RBD(t, "snap", "create", "rbd/"+name+"@theirs")
	var ls []struct{ Name, Protected string }
	if err := json.Unmarshal([]byte(c.RBD(t, "snap", "ls", "--format", "json", "rbd/"+name)), &ls); err != nil || len(ls) != 2 || ls[0].Name != "ours" {
		t.Fatalf("rbd snap ls: %+v %v", ls, err)
	}
	c.RBD(t, "snap", "protect", "rbd/"+name+"@theirs")
	snaps, err := Snapshots(spec)
	if err != nil || len(snaps) != 2 || snaps[1].Name != "theirs" || !snaps[1].Protected || snaps[0].Protected || snaps[0].Size != 4<<20 || time.Since(snaps[0].Time) > time.Hour {
		t.Fatalf("Snapshots: %+v %v", snaps, err)
	}
	if err := CreateSnapshot(spec, "ours"); !errors.Is(err, os.ErrExist) {
		t.Errorf("a second snapshot named ours: %v", err)
	}
	c.RBD(t, "clone", "rbd/"+name+"@theirs", "rbd/"+name+"-kid")
	if err := DeleteSnapshot(spec, "theirs"); err == nil {
		t.Error("a snapshot with a clone was deleted")
	}
	c.RBD(t, "rm", "--no-progress", "rbd/"+name+"-kid")
	for _, s := range []string{"theirs", "ours"} {
		if err := DeleteSnapshot(spec, s); err != nil {
			t.Fatal(err)
		}
	}
	if err := DeleteSnapshot(spec, "ours"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("deleting a missing snapshot: %v", err)
	}
	if out := c.RBD(t, "snap", "ls", "--format", "json", "rbd/"+name); out != "[]\n" && out != "[]" {
		t.Errorf("rbd snap ls after the deletes: %q", out)
	}
	// A writer holds the image: librbd forwards the snapshot to the
	// holder, which takes it between requests (crash-consistent).
	img, err := Open(spec, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if _, err := img.WriteAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if err := CreateSnapshot(spec, "held"); err != nil {
		t.Fatalf("snapshot of an image a writer holds: %v", err)
	}
	if out := c.RBD(t, "snap", "ls", "rbd/"+name); !strings.Contains(out, "held") {
		t.Errorf("rbd snap ls after a snapshot of a held image:\n%s", out)
	}
	if err := DeleteSnapshot(spec, "held"); err != nil {
		t.Fatalf("delete a snapshot of a held image: %v", err)
	}
	if _, err := img.WriteAt(make([]byte, 4096), 4096); err != nil {
		t.Fatalf("the writer after the snapshot: %v", err)
	}
}

func removeSnaps(conf, name string) {
	for _, args := range [][]string{{"rm", "--no-progress", "rbd/" + name + "-kid"}, {"snap", "unprotect", "rbd/" + name + "@theirs"}, {"snap", "purge", "--no-progress", "rbd/" + name}} {
		runRBD(conf, args...)
	}
}

func runRBD(conf string, args ...string) {
	exec.Command("rbd", append([]string{"-c", conf}, args...)...).Run()
}
