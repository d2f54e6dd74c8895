package qcow2

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/backing"
	"github.com/blktap-go/blktap/formats/internal/crashfs"
	"github.com/blktap-go/blktap/formats/internal/imagetest"
)

// TestRebaseCrash cuts the power at every write and every sync a safe
// rebase makes, in turn, keeping a random subset of the unsynced writes
// or the newest one alone. After each cut the image must read exactly
// what it read before the rebase, over whichever backing file its header
// names then (old.raw or the new one, never a mix), pass our check and
// qemu-img check (leaks allowed), and once the rebase has returned, name
// the new backing file. qemu-img reads the content itself at every
// eighth point.
func TestRebaseCrash(t *testing.T) {
	dir := t.TempDir()
	const size = 512 << 10
	rng := rand.New(rand.NewPCG(7, 7))
	oldB := fill(rng, size)
	newB := bytes.Clone(oldB[:size-96<<10]) // shorter than the image
	for _, off := range []int{0, 40 << 10, 200 << 10, 300 << 10} {
		copy(newB[off:off+20<<10], fill(rng, 20<<10)) // differs here only
	}
	for name, b := range map[string][]byte{"old.raw": oldB, "new.raw": newB} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	configs := []struct {
		name, backing, format string
		o                     CreateOptions
	}{
		{"v3-to-new", "new.raw", "raw", CreateOptions{Size: size, ClusterSize: 4096}},
		{"v2-to-new", "new.raw", "raw", CreateOptions{Size: size, ClusterSize: 4096, Compat: "0.10"}},
		{"v3-standalone", "", "", CreateOptions{Size: size, ClusterSize: 4096}},
		// A name long enough that the new header spans more bytes.
		{"v3-long-name", "./././././././././././././././././././././././new.raw", "raw", CreateOptions{Size: size, ClusterSize: 65536}},
	}
	for _, c := range configs {
		t.Run(c.name, func(t *testing.T) {
			c.o.Backing, c.o.BackingFormat = "old.raw", "raw"
			tmpl := filepath.Join(dir, c.name+".tmpl")
			data, want := rebaseTemplate(t, tmpl, c.o, rng)
			var nb image.Image
			if c.backing != "" {
				nb = mustOpenRaw(t, filepath.Join(dir, "new.raw"))
			}
			total := rebaseOnCrashFS(t, tmpl, data, nb, c.backing, c.format, 0, nil, nil, false)
			everyCrashPoint(t, total, func(n, coin int, keep *rand.Rand) {
				p := filepath.Join(dir, fmt.Sprintf("%s-%d-%d.qcow2", c.name, n, coin))
				rebaseOnCrashFS(t, tmpl, data, nb, c.backing, c.format, n, func(b []byte) {
					if err := os.WriteFile(p, b, 0o644); err != nil {
						t.Fatal(err)
					}
				}, keep, coin == 1)
				checkRebased(t, p, want, c.backing, n > total, n%8 == 0)
				os.Remove(p)
			})
		})
	}
}

// rebaseTemplate makes an overlay over old.raw holding data of its own
// and a zero cluster, and returns its bytes and the content it reads.
func rebaseTemplate(t *testing.T, tmpl string, o CreateOptions, rng *rand.Rand) ([]byte, []byte) {
	t.Helper()
	if err := Create(tmpl, o); err != nil {
		t.Fatal(err)
	}
	img, err := Open(tmpl, Options{Backing: openerFor(tmpl)})
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{4 << 10, 44 << 10, 150 << 10, 440 << 10} {
		if _, err := img.WriteAt(fill(rng, 12<<10), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := img.Discard(300<<10, 8<<10); err != nil {
		t.Fatal(err)
	}
	want := readAll(t, img)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(tmpl)
	if err != nil {
		t.Fatal(err)
	}
	return data, want
}

func mustOpenRaw(t *testing.T, p string) image.Image {
	t.Helper()
	r, err := openRaw(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// rebaseOnCrashFS rebases a copy of data held on a crashfs file. With
// crashAt 0 it runs to the end and returns how many writes and syncs the
// rebase made; otherwise the power is cut at that operation (or after the
// rebase, if it made fewer) and save gets what the disk kept.
func rebaseOnCrashFS(t *testing.T, tmpl string, data []byte, nb image.Image, name, format string, crashAt int, save func([]byte), keep *rand.Rand, lastOnly bool) int {
	t.Helper()
	mf, img := openOnCrashFS(t, tmpl, data)
	fs := mf.FS()
	w0, s0 := fs.Writes(), fs.Syncs()
	if crashAt > 0 {
		fs.Schedule(crashAt, crashfs.Writes|crashfs.Syncs)
	}
	err := backing.Rebase(context.Background(), img, nb, name, format, backing.Options{})
	if crashAt == 0 {
		if err != nil {
			t.Fatal(err)
		}
		n := fs.Writes() - w0 + fs.Syncs() - s0
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
		return n
	}
	if err != nil && !errors.Is(err, crashfs.ErrCrashed) {
		t.Fatalf("rebase: %v", err)
	}
	// Coin 0 keeps a random subset; coin 1 the newest write alone, the
	// order a disk cache is least kind in (a header that outruns its data).
	pending, _ := mf.Pending()
	i := 0
	save(mf.Crash(func() bool {
		i++
		if lastOnly {
			return i == len(pending)
		}
		return keep.IntN(2) == 0
	}))
	return 0
}

// checkRebased: the image at p reads want, is consistent, and names the
// old backing file or (always, once done) the new one.
func checkRebased(t *testing.T, p string, want []byte, newName string, done, withQemu bool) {
	t.Helper()
	res, err := Check(p, CheckOptions{})
	if err != nil || res.Corruptions != 0 {
		t.Fatalf("%s: our check: %v %+v", p, err, res)
	}
	img, err := Open(p, Options{ReadOnly: true, Backing: openerFor(p)})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	got, _ := img.BackingFile()
	if got != newName && (done || got != "old.raw") {
		t.Fatalf("%s: backing file %q (want old.raw or %q; done %v)", p, got, newName, done)
	}
	sameBytes(t, p+" (our reader)", readAll(t, img), want)
	if withQemu {
		if code, out := qemuCheck(t, p); code != 0 && code != 3 {
			t.Fatalf("qemu-img check %s: exit %d\n%s", p, code, out)
		}
		sameBytes(t, p+" (qemu-img)", qemuRaw(t, p), want)
	}
}

// everyCrashPoint calls cut for each of the total operations an operation
// made and once past them, with two coins each (0: a random subset of
// the unsynced writes kept; 1: the newest alone).
func everyCrashPoint(t *testing.T, total int, cut func(n, coin int, keep *rand.Rand)) {
	t.Helper()
	if total < 3 {
		t.Fatalf("only %d writes and syncs", total)
	}
	for n := 1; n <= total+1; n++ {
		for coin := range 2 {
			cut(n, coin, rand.New(rand.NewPCG(uint64(n), uint64(coin))))
		}
	}
	t.Logf("%d crash points, each with 2 coins", total+1)
}

// TestCommitCrash cuts the power at every write and sync a commit makes
// (into the base, then emptying the overlay), both files on one disk, in
// turn, keeping a random subset of the unsynced writes or the newest one
// alone. After each cut both images pass our check (no corruption) and
// the overlay reads exactly what it read before the commit; qemu-img
// checks both and reads the overlay at every eighth point.
func TestCommitCrash(t *testing.T) {
	for _, c := range []struct {
		name string
		o    CreateOptions
	}{
		{"v3", CreateOptions{Size: 512 << 10, ClusterSize: 4096}},
		{"v2", CreateOptions{Size: 512 << 10, ClusterSize: 4096, Compat: "0.10"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			rng := rand.New(rand.NewPCG(11, 11))
			files, want := commitTemplate(t, dir, c.o, rng)
			_, total := commitOnCrashFS(t, files, 0, nil, false)
			everyCrashPoint(t, total, func(n, coin int, keep *rand.Rand) {
				out, _ := commitOnCrashFS(t, files, n, keep, coin == 1)
				cdir := filepath.Join(dir, fmt.Sprintf("crash-%d-%d", n, coin))
				os.Mkdir(cdir, 0o755)
				for name, b := range out {
					if err := os.WriteFile(filepath.Join(cdir, filepath.Base(name)), b, 0o644); err != nil {
						t.Fatal(err)
					}
				}
				checkCommitted(t, cdir, want, n%8 == 0)
				os.RemoveAll(cdir)
			})
		})
	}
}

// commitTemplate makes base.qcow2 with data and top.qcow2 over it with
// data and a zero cluster of its own, and returns both files' bytes and
// what top reads.
func commitTemplate(t *testing.T, dir string, o CreateOptions, rng *rand.Rand) (map[string][]byte, []byte) {
	t.Helper()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	bi, err := CreateImage(base, o, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bi.WriteAt(fill(rng, 200<<10), 20<<10); err != nil {
		t.Fatal(err)
	}
	if err := bi.Close(); err != nil {
		t.Fatal(err)
	}
	o.Backing, o.BackingFormat = "base.qcow2", "qcow2"
	ti, err := CreateImage(top, o, Options{Backing: openerFor(top)})
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, 64 << 10, 210 << 10, 400 << 10} {
		if _, err := ti.WriteAt(fill(rng, 24<<10), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := ti.Discard(100<<10, 16<<10); err != nil {
		t.Fatal(err)
	}
	want := readAll(t, ti)
	if err := ti.Close(); err != nil {
		t.Fatal(err)
	}
	return imagetest.OnDisk(t, base, top), want
}

// commitOnCrashFS commits top.qcow2 into base.qcow2, both on one crashfs
// disk. With crashAt 0 it runs to the end and returns how many writes and
// syncs the commit made; otherwise the power is cut at that operation (or
// after the commit) and it returns what the disk kept of each file.
func commitOnCrashFS(t *testing.T, files map[string][]byte, crashAt int, keep *rand.Rand, lastOnly bool) (map[string][]byte, int) {
	t.Helper()
	fs := crashfs.FromImage(files)
	base := imagetest.OpenOn(t, fs, "/d/base.qcow2", openStorage, Options{})
	top := imagetest.OpenOn(t, fs, "/d/top.qcow2", openStorage, Options{Backing: imagetest.Fixed(base)})
	w0, s0 := fs.Writes(), fs.Syncs()
	if crashAt > 0 {
		fs.Schedule(crashAt, crashfs.Writes|crashfs.Syncs)
	}
	err := backing.Commit(context.Background(), top, base, 1, true, nil)
	if crashAt == 0 {
		if err != nil {
			t.Fatal(err)
		}
		n := fs.Writes() - w0 + fs.Syncs() - s0
		if err := top.Close(); err != nil {
			t.Fatal(err)
		}
		return nil, n
	}
	if err != nil && !errors.Is(err, crashfs.ErrCrashed) {
		t.Fatalf("commit: %v", err)
	}
	// Coin 1 keeps each file's newest unsynced write alone.
	if lastOnly {
		return fs.CrashNewestOnly(), 0
	}
	return fs.Crash(func() bool { return keep.IntN(2) == 0 }), 0
}

// checkCommitted: both images in dir are free of corruption and top reads
// want.
func checkCommitted(t *testing.T, dir string, want []byte, withQemu bool) {
	t.Helper()
	top := filepath.Join(dir, "top.qcow2")
	for _, p := range []string{filepath.Join(dir, "base.qcow2"), top} {
		res, err := Check(p, CheckOptions{})
		if err != nil || res.Corruptions != 0 {
			t.Fatalf("%s: our check: %v %+v", p, err, res)
		}
		if withQemu {
			if code, out := qemuCheck(t, p); code != 0 && code != 3 {
				t.Fatalf("qemu-img check %s: exit %d\n%s", p, code, out)
			}
		}
	}
	img, err := Open(top, Options{ReadOnly: true, Backing: openerFor(top)})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	sameBytes(t, dir+" top (our reader)", readAll(t, img), want)
	if withQemu {
		sameBytes(t, dir+" top (qemu-img)", qemuRaw(t, top), want)
	}
}
