package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats/internal/crashfs"
	"github.com/blktap-go/blktap/internal/crashtest"
)

// snapshotOps are the operations the power-cut test interrupts.
var snapshotOps = map[string]func(*Image) error{
	"create": func(img *Image) error { _, err := img.CreateSnapshot("s2", time.Unix(1e9, 0)); return err },
	"delete": func(img *Image) error { return img.DeleteSnapshot("s1") },
	"apply":  func(img *Image) error { return img.ApplySnapshot("s1") },
}

// Power cut inside a snapshot operation, at a random write or sync, with
// a random subset of the unsynced writes kept. The image must be clean to
// qemu-img check and ours, without even a leak (the operation commits by
// one header write, snapshot_commit.go), and show each layer (active, s1,
// the new s2) as before the operation or as after it.
func TestCrashSnapshotOps(t *testing.T) {
	configs := map[string]CreateOptions{
		"cs4096": {Size: 1 << 20, ClusterSize: 4096},
		// A refcount block counts 64 clusters: every operation rewrites
		// several, and the new blocks must count themselves.
		"cs512-refcount64": {Size: 1 << 20, ClusterSize: 512, RefcountBits: 64},
	}
	seeds := uint64(crashtest.PerConfig(24, 6))
	for _, name := range []string{"cs4096", "cs512-refcount64"} {
		dir := t.TempDir()
		tmpl := filepath.Join(dir, "tmpl.qcow2")
		data, active, snap := snapshotCrashTemplate(t, tmpl, configs[name])
		for _, op := range []string{"create", "delete", "apply"} {
			total := countSnapshotOpSteps(t, data, tmpl, op)
			for seed := uint64(1); seed <= seeds; seed++ {
				t.Run(fmt.Sprintf("%s/%s/seed%d", name, op, seed), func(t *testing.T) {
					rng := rand.New(rand.NewPCG(seed, 17))
					p := filepath.Join(dir, fmt.Sprintf("%s-%d.qcow2", op, seed))
					crashSnapshotOp(t, data, tmpl, p, op, 1+rng.IntN(total), rng)
					checkAfterSnapshotCrash(t, p)
					layersAfterSnapshotCrash(t, p, op, active, snap)
				})
			}
		}
	}
}

// snapshotCrashTemplate makes the image every crash starts from: 250s
// everywhere in qemu's snapshot s1, 251s over part of the active layer.
func snapshotCrashTemplate(t *testing.T, tmpl string, o CreateOptions) (data, active, snap []byte) {
	if err := Create(tmpl, o); err != nil {
		t.Fatal(err)
	}
	img, err := Open(tmpl, Options{})
	if err != nil {
		t.Fatal(err)
	}
	snapWrite(t, img, 250, 0, o.Size)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "snapshot", "-c", "s1", tmpl)
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 251 64k 128k", tmpl)
	if data, err = os.ReadFile(tmpl); err != nil {
		t.Fatal(err)
	}
	snap = bytes.Repeat([]byte{250}, int(o.Size))
	active = bytes.Clone(snap)
	copy(active[64<<10:], bytes.Repeat([]byte{251}, 128<<10))
	return data, active, snap
}

// countSnapshotOpSteps is how many writes and syncs op makes.
func countSnapshotOpSteps(t *testing.T, data []byte, tmpl, op string) int {
	mf := newMemFile(bytes.Clone(data))
	img, err := openStorage(mf, tmpl, Options{})
	if err != nil {
		t.Fatal(err)
	}
	w, s := mf.FS().Writes(), mf.FS().Syncs()
	if err := snapshotOps[op](img); err != nil {
		t.Fatal(err)
	}
	return mf.FS().Writes() - w + mf.FS().Syncs() - s
}

// crashSnapshotOp runs op on data until its n-th write or sync fails, and
// stores at p what a disk would hold after that power cut.
func crashSnapshotOp(t *testing.T, data []byte, tmpl, p, op string, n int, rng *rand.Rand) {
	mf := newMemFile(bytes.Clone(data))
	img, err := openStorage(mf, tmpl, Options{})
	if err != nil {
		t.Fatal(err)
	}
	mf.FS().Schedule(n, crashfs.Writes|crashfs.Syncs)
	if err := snapshotOps[op](img); err != nil && !errors.Is(err, crashfs.ErrCrashed) {
		t.Fatalf("%s: %v", op, err)
	}
	if err := os.WriteFile(p, mf.Crash(func() bool { return rng.IntN(2) == 0 }), 0o644); err != nil {
		t.Fatal(err)
	}
}

// checkAfterSnapshotCrash: clean by both checks, not even a leak.
func checkAfterSnapshotCrash(t *testing.T, p string) {
	res, err := Check(p, CheckOptions{})
	if err != nil || !res.Clean() || res.Leaks != 0 {
		t.Fatalf("our check after crash: %v %+v", err, res)
	}
	requireQemuClean(t, p)
}

// layersAfterSnapshotCrash: every layer reads as before op or as after.
func layersAfterSnapshotCrash(t *testing.T, p, op string, active, snap []byte) {
	names := qemuSnapshotNames(t, p)
	list := strings.Join(names, " ")
	wantList := map[string][]string{
		"create": {"1:s1", "1:s1 2:s2"}, "delete": {"1:s1", ""}, "apply": {"1:s1"},
	}[op]
	if list != wantList[0] && list != wantList[len(wantList)-1] {
		t.Fatalf("snapshots after crash: %q", list)
	}
	for _, n := range names {
		name := n[strings.IndexByte(n, ':')+1:]
		want := snap
		if name == "s2" {
			want = active
		}
		if !bytes.Equal(qemuRaw(t, p, "-l", name), want) {
			t.Fatalf("snapshot %s changed", name)
		}
	}
	got := qemuRaw(t, p)
	if !bytes.Equal(got, active) && !(op == "apply" && bytes.Equal(got, snap)) {
		t.Fatalf("active layer after crash is neither before nor after %s", op)
	}
}

// A write error (not a crash) at the header switch: the Image refuses
// every later write, and the file, reopened, is clean whichever
// metadata its header names.
func TestSnapshotCommitWriteError(t *testing.T) {
	dir := t.TempDir()
	tmpl := filepath.Join(dir, "tmpl.qcow2")
	data, active, _ := snapshotCrashTemplate(t, tmpl, CreateOptions{Size: 1 << 20, ClusterSize: 4096})
	probe := newMemFile(bytes.Clone(data))
	img, err := openStorage(probe, tmpl, Options{})
	if err != nil {
		t.Fatal(err)
	}
	w := probe.FS().Writes()
	if _, err := img.CreateSnapshot("s2", time.Now()); err != nil {
		t.Fatal(err)
	}
	last := probe.FS().Writes() - w // the header write is the operation's last
	mf := newMemFile(bytes.Clone(data))
	if img, err = openStorage(mf, tmpl, Options{}); err != nil {
		t.Fatal(err)
	}
	injected := errors.New("injected EIO")
	mf.FS().FailWrites(func(nth int) error {
		if nth == w+last {
			return injected
		}
		return nil
	})
	if _, err := img.CreateSnapshot("s2", time.Now()); !errors.Is(err, injected) {
		t.Fatalf("create with a failing header write: %v", err)
	}
	if _, err := img.WriteAt([]byte{1}, 0); err == nil || !strings.Contains(err.Error(), "reopen") {
		t.Fatalf("a write after the failed commit: %v", err)
	}
	img.Close()
	p := filepath.Join(dir, "after.qcow2")
	if err := os.WriteFile(p, mf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	checkAfterSnapshotCrash(t, p)
	if !bytes.Equal(qemuRaw(t, p), active) {
		t.Fatal("active layer changed")
	}
}
