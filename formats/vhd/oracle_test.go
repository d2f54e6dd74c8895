package vhd

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/internal/oracle"
)

// TestReadQemuImages: every VHD layout qemu-img makes (vpc fixed and
// dynamic, with and without force_size) reads through our code exactly
// as qemu-img convert -O raw reads it, after qemu-io wrote patterns at
// sector, block and end-of-disk edges.
func TestReadQemuImages(t *testing.T) {
	qi := oracle.Require(t, "qemu-img")
	qio := oracle.Require(t, "qemu-io")
	cases := []struct {
		name, opts string
		size       int64
	}{
		{"dynamic", "subformat=dynamic", 40 << 20},
		{"dynamic-force-size", "subformat=dynamic,force_size=on", 20<<20 + 3*512},
		{"fixed", "subformat=fixed", 9 << 20},
		{"fixed-force-size", "subformat=fixed,force_size=on", 5<<20 + 512},
		{"dynamic-odd-chs", "subformat=dynamic", 33<<20 + 4096},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "q.vhd")
			runCmd(t, qi, "create", "-q", "-f", "vpc", "-o", c.opts, p, fmt.Sprint(c.size))
			vs := qemuImgInfo(t, p).VirtualSize
			runCmd(t, qio, "-f", "vpc",
				"-c", "write -P 0x11 0 4k",
				"-c", "write -P 0x22 1536 512",
				"-c", fmt.Sprintf("write -P 0x33 %d 64k", 2<<20-32768),
				"-c", fmt.Sprintf("write -P 0x44 %d 4096", vs-4096),
				"-c", fmt.Sprintf("write -z %d 8k", 2<<20-4096),
				p)
			want := qemuRaw(t, p)
			img, err := Open(p, Options{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if img.Size() != vs {
				t.Fatalf("size %d, qemu says %d", img.Size(), vs)
			}
			mustEqual(t, "our read vs qemu-img convert", readAll(t, img), want)
			r, err := Check(p, CheckOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if !r.OK() {
				t.Fatalf("check of a qemu image: %+v", r)
			}
		})
	}
}

// writeScript is a set of writes that cross sector and block edges.
func writeScript(size int64) []struct {
	off int64
	n   int
} {
	return []struct {
		off int64
		n   int
	}{
		{0, 4096}, {1000, 3000}, {2<<20 - 700, 1500}, {(2 << 20) * 3, 512},
		{5<<20 + 3, 1 << 20}, {size - 1000, 1000}, {size/2 + 17, 70000}, {1000, 10},
	}
}

// TestOurImagesThroughQemu: images we create and write are accepted by
// qemu-img info and vhdiinfo and read identically by qemu-img convert.
func TestOurImagesThroughQemu(t *testing.T) {
	vi := oracle.Require(t, "vhdiinfo")
	for _, sub := range []string{"dynamic", "fixed"} {
		t.Run(sub, func(t *testing.T) {
			const size = 24<<20 + 1536
			p := filepath.Join(t.TempDir(), "ours.vhd")
			if err := Create(p, CreateOptions{Size: size, Subformat: sub}); err != nil {
				t.Fatal(err)
			}
			if err := Create(p, CreateOptions{Size: size}); err == nil {
				t.Fatal("Create overwrote an existing file")
			}
			in := qemuImgInfo(t, p)
			if in.Format != "vpc" || in.VirtualSize != size {
				t.Fatalf("qemu-img info: %+v", in)
			}
			img, err := Open(p, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if in := img.Info(); in.CreatorApp != "tap" || in.CreatorVersion != "1.3" || in.Batmap != (sub == "dynamic") || in.SizeFrom != "current_size" {
				t.Fatalf("info: %+v", in)
			}
			model := make([]byte, size)
			for i, w := range writeScript(size) {
				b := make([]byte, w.n)
				pattern(b, int64(i))
				if _, err := img.WriteAt(b, w.off); err != nil {
					t.Fatal(err)
				}
				copy(model[w.off:], b)
			}
			mustEqual(t, "read back", readAll(t, img), model)
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			mustEqual(t, "qemu-img convert of our image", qemuRaw(t, p), model)
			mustEqual(t, "vhdimount of our image", vhdimount(t, p), model)
			out := runCmd(t, vi, p)
			if !strings.Contains(out, fmt.Sprintf("%d bytes", size)) {
				t.Fatalf("vhdiinfo does not report the size:\n%s", out)
			}
			if r, err := Check(p, CheckOptions{}); err != nil || !r.OK() || r.LeakedBytes != 0 {
				t.Fatalf("check: %+v %v", r, err)
			}
		})
	}
}

// TestMixedWriters: qemu-io writes into our image, we read; we write, qemu reads.
func TestMixedWriters(t *testing.T) {
	qio := oracle.Require(t, "qemu-io")
	const size = 16 << 20
	p := filepath.Join(t.TempDir(), "mixed.vhd")
	if err := Create(p, CreateOptions{Size: size}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	b := bytes.Repeat([]byte{0x5a}, 8192)
	if _, err := img.WriteAt(b, 3<<20); err != nil {
		t.Fatal(err)
	}
	img.Close()
	runCmd(t, qio, "-f", "vpc", "-c", "read -P 0x5a 3M 8k", "-c", "write -P 0x66 8M 1M", "-c", "write -P 0x77 3M 512", p)
	img, err = Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "after qemu-io wrote", readAll(t, img), qemuRaw(t, p))
	if _, err := img.WriteAt(bytes.Repeat([]byte{0x88}, 5000), 12<<20+100); err != nil {
		t.Fatal(err)
	}
	want := readAll(t, img)
	img.Close()
	mustEqual(t, "qemu after our second write", qemuRaw(t, p), want)
	runCmd(t, qio, "-f", "vpc", "-c", "read -P 0x88 12583012 5000", "-c", "read -P 0x66 8M 1M", p)
	if r, err := Check(p, CheckOptions{}); err != nil || !r.OK() {
		t.Fatalf("check: %+v %v", r, err)
	}
}

// TestDifferencing: a child over our parent reads parent data where it
// has none, its own elsewhere; vhdiinfo accepts it and names the parent.
func TestDifferencing(t *testing.T) {
	vi := oracle.Require(t, "vhdiinfo")
	dir := t.TempDir()
	const size = 12 << 20
	parent, model := diffParent(t, dir, size)
	child := filepath.Join(dir, "sub", "child.vhd")
	os.Mkdir(filepath.Dir(child), 0o755)
	if err := Create(child, CreateOptions{Backing: "../parent.vhd", BackingFormat: "vhd"}); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(child, Options{}); err == nil {
		t.Fatal("a differencing disk opened without a backing opener")
	}
	diffChildAlone(t, child)
	diffChildWrites(t, child, model)
	out := runCmd(t, vi, child)
	if !strings.Contains(out, "Differential") || !strings.Contains(out, "parent.vhd") {
		t.Fatalf("vhdiinfo on the child:\n%s", out)
	}
	mustEqual(t, "vhdimount of the child", vhdimount(t, child), model)
	if r, err := Check(child, CheckOptions{Backing: fileOpener(filepath.Dir(child))}); err != nil || !r.OK() {
		t.Fatalf("check child: %+v %v", r, err)
	}
	// A parent with another uuid is refused.
	other := filepath.Join(dir, "other.vhd")
	if err := Create(other, CreateOptions{Size: size}); err != nil {
		t.Fatal(err)
	}
	os.Rename(other, parent)
	if _, err := Open(child, Options{ReadOnly: true, Backing: fileOpener(filepath.Dir(child))}); err == nil || !strings.Contains(err.Error(), "uuid") {
		t.Fatalf("open with a wrong parent: %v", err)
	}
}

// diffParent creates parent.vhd in dir with a pattern at 1 MiB and
// returns its path and what it reads as.
func diffParent(t *testing.T, dir string, size int64) (string, []byte) {
	parent := filepath.Join(dir, "parent.vhd")
	if err := Create(parent, CreateOptions{Size: size}); err != nil {
		t.Fatal(err)
	}
	pimg, err := Open(parent, Options{})
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, size)
	pb := make([]byte, 5<<20)
	pattern(pb, 99)
	if _, err := pimg.WriteAt(pb, 1<<20); err != nil {
		t.Fatal(err)
	}
	copy(model[1<<20:], pb)
	pimg.Close()

	return parent, model
}

// diffChildAlone: a child opened without its parent reports its locators
// and refuses a read that needs the parent.
func diffChildAlone(t *testing.T, child string) {
	alone, err := Open(child, Options{ReadOnly: true, SkipParent: true})
	if err != nil {
		t.Fatal(err)
	}
	if in := alone.Info(); in.BackingFile != "../parent.vhd" || in.Subformat != "differencing" || len(in.ParentLocators) != 3 {
		t.Fatalf("info of a child alone: %+v", in)
	}
	if _, err := alone.ReadAt(make([]byte, 512), 0); !errors.Is(err, image.ErrUnsupported) {
		t.Fatalf("read needing the missing parent: %v", err)
	}
	alone.Close()
}

// diffChildWrites: the child reads its parent's data until written, its
// own after, maps both layers, and reads the same once reopened.
func diffChildWrites(t *testing.T, child string, model []byte) {
	size := int64(len(model))
	cimg, err := Open(child, Options{Backing: fileOpener(filepath.Dir(child))})
	if err != nil {
		t.Fatal(err)
	}
	if n, f := cimg.BackingFile(); n != "../parent.vhd" || f != "vhd" {
		t.Fatalf("BackingFile = %q %q", n, f)
	}
	mustEqual(t, "child before writes", readAll(t, cimg), model)
	for i, w := range writeScript(size) {
		b := make([]byte, w.n)
		pattern(b, int64(100+i))
		if _, err := cimg.WriteAt(b, w.off); err != nil {
			t.Fatal(err)
		}
		copy(model[w.off:], b)
	}
	if err := cimg.Discard(9<<20+100, 1<<20); err != nil {
		t.Fatal(err)
	}
	clear(model[9<<20+100 : 10<<20+100])
	mustEqual(t, "child after writes", readAll(t, cimg), model)
	ext, err := cimg.Map(0, size)
	if err != nil {
		t.Fatal(err)
	}
	if ext[0].Depth != 0 || ext[1].Depth != 1 {
		t.Fatalf("map: %+v", ext[:2])
	}
	cimg.Close()
	cimg, err = Open(child, Options{ReadOnly: true, Backing: fileOpener(filepath.Dir(child))})
	if err != nil {
		t.Fatal(err)
	}
	mustEqual(t, "child reopened", readAll(t, cimg), model)
	cimg.Close()
}

// vhdimount reads a VHD (its whole chain) through libvhdi.
func vhdimount(t *testing.T, path string) []byte { return oracle.VHDIMount(t, path) }
