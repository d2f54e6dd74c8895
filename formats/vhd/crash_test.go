package vhd

import (
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/crashfs"
	"github.com/blktap-go/blktap/internal/crashtest"
	"github.com/blktap-go/blktap/internal/oracle"
)

func haveQemu() bool { _, err := exec.LookPath("qemu-img"); return err == nil }

// memImage creates an image in memory and opens it on a crashfs file.
func memImage(t testing.TB, opts CreateOptions, parent *Image) (*crashfs.File, *Image) {
	t.Helper()
	opts.Now = func() time.Time { return time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC) }
	plan, err := planCreate("/nonexistent/mem.vhd", opts)
	if err != nil {
		t.Fatal(err)
	}
	f := newCrashFile(nil)
	if err := plan.write(f); err != nil {
		t.Fatal(err)
	}
	open := parentOpener(parent)
	img, err := openFile(f, "mem.vhd", Options{Backing: open, Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	return f, img
}

// parentOpener opens parent for a child (nil: no parent).
func parentOpener(parent *Image) image.OpenFunc {
	if parent == nil {
		return nil
	}
	return func(string, string) (image.Image, error) { return nopClose{parent}, nil }
}

// nopClose lets several children share one parent.
type nopClose struct{ image.Image }

func (n nopClose) Close() error   { return nil }
func (n nopClose) UUID() [16]byte { return n.Image.(*Image).UUID() }

// TestCrashConsistency cuts power at random points of a random workload
// on a layer that keeps synced writes and a random subset of the rest:
// the image must open, pass Check, and hold every write acknowledged
// before the last completed Flush.
func TestCrashConsistency(t *testing.T) {
	seeds := int64(crashtest.PerConfig(12, 2))
	for _, kind := range []string{"dynamic", "differencing"} {
		for seed := int64(1); seed <= seeds; seed++ {
			t.Run(fmt.Sprintf("%s/seed%d", kind, seed), func(t *testing.T) { crashOnce(t, kind, seed) })
		}
	}
}

func crashOnce(t *testing.T, kind string, seed int64) {
	const size = 3<<20 + 512
	r := rand.New(rand.NewSource(seed))
	var parent *Image
	base := make([]byte, size)
	if kind == "differencing" {
		_, parent = memImage(t, CreateOptions{Size: size, BlockSize: 256 << 10}, nil)
		pattern(base, seed+1000)
		if _, err := parent.WriteAt(base, 0); err != nil {
			t.Fatal(err)
		}
		parent.ro = true
	}
	opts := CreateOptions{Size: size, BlockSize: 256 << 10}
	var f *crashfs.File
	var img *Image
	if parent != nil {
		// planCreate needs the parent's footer on disk.
		f, img = memChild(t, parent, opts)
	} else {
		f, img = memImage(t, opts, nil)
	}
	model, flushed, dirty := crashRandomOps(t, r, img, base)
	mustEqual(t, "before the crash", readAll(t, img), model)
	// Each write since the last sync kept when the coin says so.
	after := newCrashFile(f.Crash(func() bool { return r.Intn(2) == 0 }))
	res, err := checkFile(after, "crashed.vhd", CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	open := parentOpener(parent)
	img2, err := openFile(after, "crashed.vhd", Options{Backing: open, Logger: discardLogger()})
	if err != nil {
		t.Fatalf("reopen after crash: %v (check: %+v)", err, res)
	}
	// A footer lost between an allocation's two syncs is the
	// one thing a crash may leave; a writable open fixes it.
	if res2, _ := checkFile(after, "crashed.vhd", CheckOptions{}); !res2.OK() {
		t.Fatalf("check after crash and reopen: %+v (before reopen: %+v)", res2, res)
	}
	got := readAll(t, img2)
	if kind == "dynamic" && seed <= 3 && (oracle.InCI() || haveQemu()) {
		// qemu (which ignores bitmaps) must read the crashed
		// disk as we do.
		p := filepath.Join(t.TempDir(), "crashed.vhd")
		if err := os.WriteFile(p, after.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
		mustEqual(t, "qemu-img convert of the crashed disk", qemuRaw(t, p), got)
	}
	for j := range got {
		if !dirty[j] && got[j] != flushed[j] {
			t.Fatalf("byte %d flushed as %#x reads %#x after the crash", j, flushed[j], got[j])
		}
	}
}

// crashRandomOps runs 5 to 34 random writes, discards and flushes on img,
// which starts as base. It returns what img reads as now, what it held at
// the last completed flush, and which bytes were written since.
func crashRandomOps(t *testing.T, r *rand.Rand, img *Image, base []byte) (model, flushed []byte, dirty []bool) {
	size := int64(len(base))
	model = append([]byte(nil), base...)
	flushed = append([]byte(nil), model...)
	dirty = make([]bool, size) // written since the last flush
	steps := 5 + r.Intn(30)
	for i := 0; i < steps; i++ {
		off := r.Int63n(size)
		n := 1 + r.Int63n(min(size-off, 100000))
		switch r.Intn(6) {
		case 0:
			if err := img.Flush(); err != nil {
				t.Fatal(err)
			}
			copy(flushed, model)
			clear(dirty)
		case 1:
			if err := img.Discard(off, n); err != nil {
				t.Fatal(err)
			}
			clear(model[off : off+n])
			for j := off; j < off+n; j++ {
				dirty[j] = true
			}
		default:
			b := make([]byte, n)
			pattern(b, r.Int63())
			if _, err := img.WriteAt(b, off); err != nil {
				t.Fatal(err)
			}
			copy(model[off:], b)
			for j := off; j < off+n; j++ {
				dirty[j] = true
			}
		}
	}
	return model, flushed, dirty
}

// memChild makes a differencing child of an in-memory parent.
func memChild(t testing.TB, parent *Image, opts CreateOptions) (*crashfs.File, *Image) {
	t.Helper()
	plan, err := planCreate("/nonexistent/mem.vhd", CreateOptions{Size: opts.Size, BlockSize: opts.BlockSize})
	if err != nil {
		t.Fatal(err)
	}
	h := plan.hdr
	plan.foot.Type = typeDiff
	h.ParentUUID = parent.UUID()
	copy(h.ParentName[:], encodeUTF16("parent.vhd", true))
	f := newCrashFile(nil)
	if err := plan.write(f); err != nil {
		t.Fatal(err)
	}
	open := parentOpener(parent)
	img, err := openFile(f, "child.vhd", Options{Backing: open, Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	return f, img
}

// TestWriteFailures fails each write of an allocation in turn: the
// caller gets the error, and the file still opens, passes Check, and
// keeps the data written before.
func TestWriteFailures(t *testing.T) {
	for n := 1; n <= 6; n++ {
		for _, kind := range []string{"dynamic", "differencing"} {
			var f *crashfs.File
			var img *Image
			var parent *Image
			if kind == "dynamic" {
				f, img = memImage(t, CreateOptions{Size: 4 << 20, BlockSize: 1 << 20}, nil)
			} else {
				_, parent = memImage(t, CreateOptions{Size: 4 << 20, BlockSize: 1 << 20}, nil)
				f, img = memChild(t, parent, CreateOptions{Size: 4 << 20, BlockSize: 1 << 20})
			}
			old := make([]byte, 3000)
			pattern(old, 5)
			if _, err := img.WriteAt(old, 100); err != nil {
				t.Fatal(err)
			}
			failAt := f.FS().Writes() + n
			f.FS().FailWrites(func(nth int) error {
				if nth == failAt {
					return errors.New("injected write failure")
				}
				return nil
			})
			_, werr := img.WriteAt(make([]byte, 5000), 2<<20+700)
			f.FS().FailWrites(nil)
			if werr == nil && n <= 3 {
				t.Fatalf("%s: failing write %d went unreported", kind, n)
			}
			open := parentOpener(parent)
			again, err := openFile(newCrashFile(f.Bytes()), "x", Options{Backing: open, Logger: discardLogger()})
			if err != nil {
				t.Fatalf("%s: reopen after failed write %d: %v", kind, n, err)
			}
			got := make([]byte, 3000)
			again.ReadAt(got, 100)
			mustEqual(t, "data before the failure", got, old)
			if r, err := checkFile(newCrashFile(f.Bytes()), "x", CheckOptions{}); err != nil || len(r.Corruptions) > 1 {
				t.Fatalf("%s: check after failed write %d: %+v %v", kind, n, r, err)
			}
		}
	}
}
