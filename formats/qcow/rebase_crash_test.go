package qcow

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/blktap-go/blktap/formats/internal/backing"
	"github.com/blktap-go/blktap/formats/internal/crashfs"
	"github.com/blktap-go/blktap/formats/internal/imagetest"
)

// TestCommitCrash cuts the power at every write and sync of a commit
// (into a qcow base, then emptying the qcow overlay; both on one disk),
// keeping each unsynced write with odds of one in two, or one in four.
// After each cut both images pass Check and the overlay reads what it
// read before: in particular no cluster whose L2 entry survived was
// punched out from under it (MakeEmpty syncs the entries first).
func TestCommitCrash(t *testing.T) {
	const size = 256 << 10
	rng := rand.New(rand.NewPCG(5, 5))
	baseH, err := createHeader(CreateOptions{Size: size})
	if err != nil {
		t.Fatal(err)
	}
	topH, err := createHeader(CreateOptions{Size: size, Backing: "base.qcow", ClusterSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{"/d/base.qcow": initialFile(baseH), "/d/top.qcow": initialFile(topH)}
	fs := crashfs.FromImage(files)
	base, top := openPair(t, fs)
	for _, img := range []*Image{base, top, top} {
		off := int64(rng.IntN(size/4096-8)) * 4096
		if _, err := img.WriteAt(randBytes(rng, 24<<10), off); err != nil {
			t.Fatal(err)
		}
	}
	want := make([]byte, size)
	if _, err := top.ReadAt(want, 0); err != nil {
		t.Fatal(err)
	}
	if err := top.Close(); err != nil {
		t.Fatal(err)
	}
	files = fs.Crash(func() bool { return true })
	total := 0
	for n := 0; n == 0 || n <= total+1; n++ {
		for coin := range 2 {
			if n == 0 && coin == 1 {
				continue
			}
			fs := crashfs.FromImage(files)
			base, top := openPair(t, fs)
			w0 := fs.Writes() + fs.Syncs()
			if n > 0 {
				fs.Schedule(n, crashfs.Writes|crashfs.Syncs)
			}
			err := backing.Commit(context.Background(), top, base, 1, true, nil)
			if n == 0 {
				if err != nil {
					t.Fatal(err)
				}
				total = fs.Writes() + fs.Syncs() - w0
				continue
			}
			if err != nil && !errors.Is(err, crashfs.ErrCrashed) {
				t.Fatalf("commit: %v", err)
			}
			keep := rand.New(rand.NewPCG(uint64(n), uint64(coin)))
			out := fs.Crash(func() bool { return coin == 0 && keep.IntN(2) == 0 || coin == 1 && keep.IntN(4) == 0 })
			checkCommittedQcow(t, out, want)
		}
	}
	if total < 3 {
		t.Fatalf("the commit made only %d writes and syncs", total)
	}
	t.Logf("%d crash points, each with 2 coins", total+1)
}

// openPair opens /d/base.qcow and /d/top.qcow (over it) on fs.
func openPair(t *testing.T, fs *crashfs.FS) (*Image, *Image) {
	t.Helper()
	base := imagetest.OpenOn(t, fs, "/d/base.qcow", openStorage, Options{})
	top := imagetest.OpenOn(t, fs, "/d/top.qcow", openStorage, Options{Backing: imagetest.Fixed(base)})
	return base, top
}

// checkCommittedQcow: both files pass Check and the overlay reads want.
func checkCommittedQcow(t *testing.T, out map[string][]byte, want []byte) {
	t.Helper()
	dir := t.TempDir()
	for name, b := range out {
		p := filepath.Join(dir, filepath.Base(name))
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		if r, err := Check(p, CheckOptions{}); err != nil || !r.OK() {
			t.Fatalf("%s: check: %v %+v", name, err, r)
		}
	}
	base, err := Open(filepath.Join(dir, "base.qcow"), Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	top, err := Open(filepath.Join(dir, "top.qcow"), Options{ReadOnly: true, Backing: imagetest.Fixed(base)})
	if err != nil {
		t.Fatal(err)
	}
	defer top.Close()
	got := make([]byte, len(want))
	if _, err := top.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		i := 0
		for got[i] == want[i] {
			i++
		}
		t.Fatalf("the overlay reads differently after the crash, from byte %d", i)
	}
}
