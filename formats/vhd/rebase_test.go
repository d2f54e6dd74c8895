package vhd

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/backing"
	"github.com/blktap-go/blktap/formats/internal/crashfs"
	"github.com/blktap-go/blktap/internal/oracle"
)

// TestRebaseCrash rebases a differencing disk (safe mode: what the old
// chain shows where the new parent differs is copied in first) from
// p1.vhd onto p2.vhd, which holds other data, and cuts the power at every
// write and sync in turn, each unsynced write then kept or lost by a coin.
// After each cut the child opens, checks clean, reads exactly what it read
// before, and every parent name it holds (locators and header name)
// leads to the one disk whose uuid the header records: the old parent or
// the new, never a mix. The finished rebase names p2.vhd, and libvhdi
// (vhdiinfo, vhdimount) follows it there and reads the same content.
func TestRebaseCrash(t *testing.T) {
	for _, vhdUtil := range []bool{false, true} {
		t.Run(fmt.Sprintf("vhd-util-locators=%v", vhdUtil), func(t *testing.T) {
			dir := t.TempDir()
			want, child := rebaseFixture(t, dir)
			if vhdUtil {
				child = asVHDUtilLocators(t, dir, child)
			}
			rebaseEveryCut(t, dir, child, want)
		})
	}
}

// asVHDUtilLocators rewrites the child's header as vhd-util lays it out:
// no MacX locator, data_space in bytes (the fixture already stores the
// parent's base name, as vhd-util does).
func asVHDUtilLocators(t *testing.T, dir string, child []byte) []byte {
	t.Helper()
	f := newCrashFile(child)
	img, err := openFile(f, filepath.Join(dir, "child.vhd"), Options{Backing: fileOpener(dir), Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	h := *img.hdr
	for i, l := range h.Locators {
		switch l.Code {
		case platMacX:
			h.Locators[i] = locator{}
		case platW2ku, platW2ru:
			h.Locators[i].DataSpace = l.DataSpace * sectorSize
		}
	}
	if err := img.writeHeaderSynced(&h); err != nil {
		t.Fatal(err)
	}
	img.Close()
	return f.Bytes()
}

// rebaseEveryCut runs the safe rebase of child onto p2.vhd with a cut at
// each operation in turn, and checks what each cut leaves.
func rebaseEveryCut(t *testing.T, dir string, child, want []byte) {
	for n := 1; ; n++ {
		fs := crashfs.FromImage(map[string][]byte{"/c": child})
		f, err := fs.Open("/c", os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		img, err := openFile(f, filepath.Join(dir, "child.vhd"), Options{Backing: fileOpener(dir), Logger: discardLogger()})
		if err != nil {
			t.Fatal(err)
		}
		nb, err := Open(filepath.Join(dir, "p2.vhd"), Options{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		fs.Schedule(n, crashfs.Writes|crashfs.Syncs)
		err = backing.Rebase(context.Background(), img, nb, "p2.vhd", "vpc", backing.Options{})
		nb.Close()
		if err != nil && !errors.Is(err, crashfs.ErrCrashed) {
			t.Fatalf("op %d: rebase: %v", n, err)
		}
		r := rand.New(rand.NewSource(int64(n)))
		out := fs.Crash(func() bool { return err == nil || r.Intn(2) == 0 })["/c"]
		p := filepath.Join(dir, fmt.Sprintf("crash%d.vhd", n))
		if err := os.WriteFile(p, out, 0o644); err != nil {
			t.Fatal(err)
		}
		parent := checkRebased(t, p, dir, want)
		if err == nil {
			if parent != "p2.vhd" {
				t.Fatalf("the finished rebase names %q", parent)
			}
			vi := runCmd(t, oracle.Require(t, "vhdiinfo"), p)
			if !strings.Contains(vi, "p2.vhd") {
				t.Fatalf("vhdiinfo does not name p2.vhd:\n%s", vi)
			}
			mustEqual(t, "vhdimount of the rebased child", vhdimount(t, p), want)
			t.Logf("power cut at each of %d operations", n-1)
			return
		}
		os.Remove(p)
	}
}

// rebaseFixture makes p1.vhd and p2.vhd (other uuids, other data) and a
// child of p1.vhd with data of its own, and returns what the child reads
// and its bytes.
func rebaseFixture(t *testing.T, dir string) ([]byte, []byte) {
	t.Helper()
	const size, bs = 1 << 20, 128 << 10
	for i, name := range []string{"p1.vhd", "p2.vhd"} {
		p := filepath.Join(dir, name)
		if err := Create(p, CreateOptions{Size: size, BlockSize: bs}); err != nil {
			t.Fatal(err)
		}
		img, err := Open(p, Options{})
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 600<<10)
		pattern(b, int64(i+1))
		if _, err := img.WriteAt(b, int64(i)*200<<10); err != nil {
			t.Fatal(err)
		}
		img.Close()
	}
	p := filepath.Join(dir, "child.vhd")
	if err := Create(p, CreateOptions{Backing: "p1.vhd", BackingFormat: "vhd", BlockSize: bs}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, Options{Backing: fileOpener(dir)})
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 150<<10)
	pattern(b, 9)
	if _, err := img.WriteAt(b, 100<<10+300); err != nil {
		t.Fatal(err)
	}
	want := readAll(t, img)
	img.Close()
	child, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return want, child
}

// checkRebased: the child at p (its parents in dir) opens, mended, passes
// check, reads want, and every parent name it holds leads to the disk of
// the uuid its header records. It returns the parent's name.
func checkRebased(t *testing.T, p, dir string, want []byte) string {
	t.Helper()
	img, err := Open(p, Options{Backing: fileOpener(dir), Logger: discardLogger()})
	if err != nil {
		t.Fatalf("%s: open: %v", p, err)
	}
	defer img.Close()
	mustEqual(t, p, readAll(t, img), want)
	for _, c := range img.parentCandidates {
		if !filepath.IsAbs(c) {
			c = filepath.Join(dir, c)
		}
		par, err := Open(c, Options{ReadOnly: true, SkipParent: true})
		if err != nil {
			t.Fatalf("%s: parent name %q: %v", p, c, err)
		}
		if par.UUID() != img.hdr.ParentUUID {
			t.Fatalf("%s: parent name %q leads to uuid %s, the header records %s", p, c, fmtUUID(par.UUID()), fmtUUID(img.hdr.ParentUUID))
		}
		par.Close()
	}
	if res, err := Check(p, CheckOptions{Backing: fileOpener(dir)}); err != nil || !res.OK() {
		t.Fatalf("%s: check: %v %+v", p, err, res)
	}
	name, _ := img.BackingFile()
	return filepath.Base(name)
}

// Refused before anything is written: a disk without parent, no new
// name, a parent that is not a VHD, the child itself, a missing file, a
// parent of another size.
func TestSetBackingRefused(t *testing.T) {
	dir := t.TempDir()
	_, child := rebaseFixture(t, dir)
	p := filepath.Join(dir, "c.vhd")
	if err := os.WriteFile(p, child, 0o644); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, Options{Backing: fileOpener(dir)})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if err := Create(filepath.Join(dir, "small.vhd"), CreateOptions{Size: 512 << 10}); err != nil {
		t.Fatal(err)
	}
	// The same parent under a name too long for the locators' space.
	long := strings.Repeat("d", 200) + "/" + strings.Repeat("e", 40) + "/p2.vhd" // 248 units; W2ku holds the absolute name
	os.MkdirAll(filepath.Dir(filepath.Join(dir, long)), 0o755)
	b2, _ := os.ReadFile(filepath.Join(dir, "p2.vhd"))
	if err := os.WriteFile(filepath.Join(dir, long), b2, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ name, format, want string }{
		{long, "vpc", "has room for"},
		{"", "", "standalone"},
		{"p2.vhd", "qcow2", "must be a VHD"},
		{"c.vhd", "vpc", "its own parent"},
		{"missing.vhd", "vpc", "no such file"},
		{"small.vhd", "vpc", "parent's size"},
	} {
		if err := img.SetBacking(c.name, c.format); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("SetBacking(%q, %q): %v, want %q", c.name, c.format, err, c.want)
		}
	}
	p1, err := Open(filepath.Join(dir, "p1.vhd"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer p1.Close()
	if err := p1.SetBacking("p2.vhd", "vpc"); !errors.Is(err, image.ErrUnsupported) {
		t.Errorf("a dynamic disk: %v", err)
	}
	after, _ := os.ReadFile(p)
	if string(after) != string(child) {
		t.Error("a refused SetBacking changed the file")
	}
}
