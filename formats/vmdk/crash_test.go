package vmdk

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/crashfs"
	"github.com/blktap-go/blktap/formats/internal/imagetest"
	"github.com/blktap-go/blktap/internal/crashtest"
)

// TestCrashConsistency cuts the power at a random write or sync (a
// different one per seed; odd seeds just before a sync, when the most
// writes are in flight), keeping a random subset of the unsynced writes.
// The image must then pass our check and qemu-img check and hold every
// byte acknowledged by the last completed Flush that no later operation
// touched.
func TestCrashConsistency(t *testing.T) {
	seeds := uint64(crashtest.Seeds(80))
	if raceEnabled && os.Getenv("CRASH_SEEDS") == "" {
		seeds = 24
	}
	for seed := uint64(1); seed <= seeds; seed++ {
		variant := []string{"plain", "zeroed", "child", "notables"}[seed%4]
		t.Run(fmt.Sprintf("seed%d-%s", seed, variant), func(t *testing.T) {
			crashOnce(t, seed, variant, seed <= 6)
		})
	}
}

func memOpener(fs *crashfs.FS) image.OpenFunc {
	return func(name, format string) (image.Image, error) {
		return Open(filepath.Join("/img", name), Options{ReadOnly: true, fs: fs})
	}
}

func crashOnce(t *testing.T, seed uint64, variant string, qemu bool) {
	const p = "/img/d.vmdk"
	const size int64 = 2<<20 + 4096
	fs := crashfs.New()
	coin := rand.New(rand.NewPCG(seed, 99))
	model, backing := newVariant(t, fs, p, size, variant)
	r := rand.New(rand.NewPCG(seed, 1))
	if seed%2 == 1 {
		fs.Schedule(1+r.IntN(12), crashfs.Syncs)
	} else {
		fs.Schedule(1+r.IntN(120), crashfs.Writes|crashfs.Truncates|crashfs.Syncs)
	}
	img, err := Open(p, Options{fs: fs, GTCache: 8, Backing: backing})
	if err != nil {
		t.Fatal(err)
	}
	flushed, touched := crashOps(img, r, model)
	// Each write since its file's last sync kept when the coin says so.
	snap := fs.Crash(func() bool { return coin.IntN(2) != 0 })
	fs2 := crashfs.FromImage(snap)
	res, err := Check(p, CheckOptions{fs: fs2})
	if err != nil {
		t.Fatalf("after crash: %v", err)
	}
	if res.Corruptions != 0 {
		t.Fatalf("after crash: %+v", res)
	}
	if backing != nil {
		backing = memOpener(fs2)
	}
	img2, err := Open(p, Options{ReadOnly: true, fs: fs2, Backing: backing})
	if err != nil {
		t.Fatal(err)
	}
	got := readAll(t, img2)
	for j := range touched {
		lo, hi := int64(j)*sectorSize, min(int64(j+1)*sectorSize, size)
		if !touched[j] && lo < hi && !bytes.Equal(got[lo:hi], flushed[lo:hi]) {
			t.Fatalf("sector %d lost a flushed write", j)
		}
	}
	if qemu {
		qemuReadsCrashed(t, snap, got)
	}
}

// crashOps runs 100 random writes, discards and flushes on img (until one
// fails at the scheduled crash), keeping model; it returns what img held
// at the last completed flush and the sectors touched since.
func crashOps(img *Image, r *rand.Rand, model []byte) (flushed []byte, touched []bool) {
	size := int64(len(model))
	flushed = bytes.Clone(model)
	touched = make([]bool, size/sectorSize+1) // sectors, since the last completed flush
	touch := func(off, n int64) {
		for j := off / sectorSize; j <= (off+n-1)/sectorSize; j++ {
			touched[j] = true
		}
	}
	var err error
	for i := 0; i < 100; i++ {
		off := r.Int64N(size)
		n := min(r.Int64N(20000)+1, size-off)
		switch k := r.IntN(10); {
		case k == 0:
			if err = img.Flush(); err == nil {
				copy(flushed, model)
				clear(touched)
			}
		case k == 1:
			touch(off, n)
			if err = img.Discard(off, n); err == nil {
				clear(model[off : off+n])
			}
		default:
			touch(off, n)
			b := bytes.Repeat([]byte{byte(i + 1)}, int(n))
			if _, err = img.WriteAt(b, off); err == nil {
				copy(model[off:], b)
			}
		}
		if err != nil {
			break
		}
	}
	return flushed, touched
}

// qemuReadsCrashed: qemu-img checks the crashed files snap and reads them
// as got.
func qemuReadsCrashed(t *testing.T, snap map[string][]byte, got []byte) {
	dir := t.TempDir()
	f := filepath.Join(dir, "d.vmdk")
	for k, v := range snap {
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(k)), v, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	run(t, "qemu-img", "check", "-f", "vmdk", f)
	raw := toRaw(t, f, "vmdk")
	if !slices.Equal(raw, got) {
		t.Fatalf("qemu reads the crashed image differently at %d", imagetest.FirstDiff(raw, got))
	}
}

// newVariant creates image p of the variant on fs and returns what it
// reads as and the opener of its parent (nil if none).
func newVariant(t *testing.T, fs *crashfs.FS, p string, size int64, variant string) ([]byte, image.OpenFunc) {
	t.Helper()
	model := make([]byte, size)
	var backing image.OpenFunc
	co := CreateOptions{Size: size, ClusterSize: 4096, ZeroedGrain: variant == "zeroed", fs: fs}
	if variant == "child" {
		if err := Create("/img/base.vmdk", co); err != nil {
			t.Fatal(err)
		}
		base, err := Open("/img/base.vmdk", Options{fs: fs})
		if err != nil {
			t.Fatal(err)
		}
		for i := range model {
			model[i] = byte(i>>12) | 0x80
		}
		if _, err := base.WriteAt(model, 0); err != nil {
			t.Fatal(err)
		}
		if err := base.Close(); err != nil {
			t.Fatal(err)
		}
		co.Backing = "base.vmdk"
		backing = memOpener(fs)
	}
	if err := Create(p, co); err != nil {
		t.Fatal(err)
	}
	if variant == "notables" {
		fs.SetFile(p, dropTables(t, fs.ReadFile(p)))
	}
	return model, backing
}

// dropTables zeroes every grain directory entry (primary and redundant),
// as in an image whose tables were never preallocated; writes must then
// place new tables.
func dropTables(t testing.TB, b []byte) []byte {
	t.Helper()
	b = bytes.Clone(b)
	h, err := parseSparseHeader(b, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, dir := range []uint64{h.GDOffset, h.RGDOffset} {
		clear(b[dir*sectorSize : dir*sectorSize+h.gdEntries()*4])
	}
	return b
}
