package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/blktap-go/blktap/formats/internal/crashfs"
	"github.com/blktap-go/blktap/internal/crashtest"
)

// A power cut at every write, truncate, punch and sync of a resize, each
// unsynced write then kept or lost by a coin: the image must be valid
// (qemu-img check: no corruption, leaks allowed, clean after -r leaks)
// and be either the old image, whole, or the new one: the old data up to
// the smaller size and zeros past it.
func TestResizeCrash(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, bytes.Repeat([]byte{0xEE}, 4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	const mib = 1 << 20
	configs := []struct {
		name     string
		o        CreateOptions
		newSize  int64
		snapshot bool
	}{
		{"grow-l1-moves", CreateOptions{Size: mib, ClusterSize: 512}, 5 * mib, false},
		{"grow-v2", CreateOptions{Size: mib, ClusterSize: 512, Compat: "0.10"}, 3 * mib, false},
		{"grow-over-backing", CreateOptions{Size: mib, ClusterSize: 4096, Backing: "base.raw", BackingFormat: "raw"}, 3 * mib, false},
		{"grow-over-backing-v2", CreateOptions{Size: mib, ClusterSize: 4096, Compat: "0.10", Backing: "base.raw", BackingFormat: "raw"}, 2 * mib, false},
		{"grow-lazy", CreateOptions{Size: mib, ClusterSize: 512, LazyRefcounts: true}, 4 * mib, false},
		{"shrink", CreateOptions{Size: mib, ClusterSize: 4096}, 300<<10 + 512, false},
		{"shrink-cs512", CreateOptions{Size: mib, ClusterSize: 512}, 100 << 10, false},
		{"shrink-snapshot", CreateOptions{Size: mib, ClusterSize: 4096}, 200 << 10, true},
	}
	for _, c := range configs {
		t.Run(c.name, func(t *testing.T) {
			tmpl := resizeTemplate(t, dir, c.name, c.o, c.snapshot)
			op := func(img *Image) error { return img.Resize(c.newSize) }
			for _, n := range cutPoints(t, dir, tmpl, op, len(configs)) {
				p := cutAt(t, dir, tmpl, op, n)
				checkCut(t, p, n, c.o.LazyRefcounts)
				size := qemuSize(t, p)
				if size != c.o.Size && size != c.newSize {
					t.Fatalf("op %d: virtual size %d, neither %d nor %d", n, size, c.o.Size, c.newSize)
				}
				want := sectorPattern(min(c.o.Size, size))
				want = append(want, make([]byte, size-int64(len(want)))...)
				sameBytes(t, fmt.Sprintf("op %d, size %d", n, size), qemuRaw(t, p), want)
				os.Remove(p)
			}
		})
	}
}

// cutPoints are the operations of op to cut the power at: every one when
// there are few; else the first and last six and a random draw between
// (CRASH_SEEDS per format raises the draw; configs share it).
func cutPoints(t *testing.T, dir string, tmpl []byte, op func(*Image) error, configs int) []int {
	total := crashOps(t, dir, tmpl, op)
	if total < 3 {
		t.Fatalf("only %d operations", total)
	}
	draw := crashtest.PerConfig(12*configs, configs)
	points := map[int]bool{}
	rng := rand.New(rand.NewPCG(uint64(total), 3))
	for n := 1; n <= total; n++ {
		if n <= 6 || n > total-6 {
			points[n] = true
		}
	}
	for i := 0; i < draw; i++ {
		points[1+rng.IntN(total)] = true
	}
	t.Logf("power cut at %d of %d operations", len(points), total)
	return slices.Sorted(maps.Keys(points))
}

// crashOps counts the operations of an uncut op: the least n at which a
// power cut no longer comes first.
func crashOps(t *testing.T, dir string, tmpl []byte, op func(*Image) error) int {
	finishes := func(n int) bool {
		mf := newMemFile(tmpl)
		img, err := openStorage(mf, filepath.Join(dir, "count.qcow2"), Options{Backing: openerFor(filepath.Join(dir, "x"))})
		if err != nil {
			t.Fatal(err)
		}
		mf.FS().Schedule(n, crashKinds)
		err = op(img)
		if err != nil && !errors.Is(err, crashfs.ErrCrashed) {
			t.Fatalf("power cut at op %d: %v", n, err)
		}
		return err == nil
	}
	hi := 1
	for !finishes(hi) {
		hi *= 2
	}
	lo := hi / 2 // lo is cut (or 0), hi finishes
	for hi-lo > 1 {
		if mid := (lo + hi) / 2; finishes(mid) {
			hi = mid
		} else {
			lo = mid
		}
	}
	return hi - 1
}

const crashKinds = crashfs.Writes | crashfs.Truncates | crashfs.Punches | crashfs.Syncs

// resizeTemplate makes an image whose every sector holds its own index
// (low byte of sector number, never 0, so zeros are told apart).
func resizeTemplate(t *testing.T, dir, name string, o CreateOptions, snapshot bool) []byte {
	tmpl := filepath.Join(dir, name+".tmpl")
	if err := Create(tmpl, o); err != nil {
		t.Fatal(err)
	}
	img, err := Open(tmpl, Options{Backing: openerFor(tmpl)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(sectorPattern(o.Size), 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if snapshot {
		run(t, "qemu-img", "snapshot", "-c", "s1", tmpl)
	}
	b, err := os.ReadFile(tmpl)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func sectorPattern(n int64) []byte {
	b := make([]byte, n)
	for s := int64(0); s < n/512; s++ {
		copy(b[s*512:], bytes.Repeat([]byte{byte(s%255) + 1}, 512))
	}
	return b
}

// cutAt cuts the power at the n-th operation of op on an image holding
// tmpl and writes what the disk kept to a file, whose path it returns.
func cutAt(t *testing.T, dir string, tmpl []byte, op func(*Image) error, n int) string {
	t.Helper()
	p := filepath.Join(dir, fmt.Sprintf("crash-%d.qcow2", n))
	mf := newMemFile(tmpl)
	img, err := openStorage(mf, p, Options{Backing: openerFor(filepath.Join(dir, "x"))})
	if err != nil {
		t.Fatal(err)
	}
	mf.FS().Schedule(n, crashKinds)
	if err := op(img); !errors.Is(err, crashfs.ErrCrashed) {
		t.Fatalf("power cut at op %d: %v", n, err)
	}
	rng := rand.New(rand.NewPCG(uint64(n), 7))
	if err := os.WriteFile(p, mf.Crash(func() bool { return rng.IntN(2) == 0 }), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// checkCut: the image at p is valid (leaks allowed) and clean once its
// leaks are repaired; a dirty one is repaired by a writable open first.
func checkCut(t *testing.T, p string, n int, lazy bool) {
	t.Helper()
	if lazy {
		img, err := Open(p, Options{})
		if err != nil {
			t.Fatalf("op %d: reopen: %v", n, err)
		}
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if res, err := Check(p, CheckOptions{}); err != nil || res.Corruptions != 0 {
		t.Fatalf("op %d: our check: %v %+v", n, err, res)
	}
	if code, out := qemuCheck(t, p); code != 0 && code != 3 {
		t.Fatalf("op %d: qemu-img check: exit %d\n%s", n, code, out)
	}
	if res, err := Check(p, CheckOptions{Repair: RepairLeaks}); err != nil || !res.Clean() {
		t.Fatalf("op %d: repair: %v %+v", n, err, res)
	}
	requireQemuClean(t, p)
}
