package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/vhd"
	"github.com/blktap-go/blktap/internal/oracle"
)

// TestImageCommitVHD: `image commit` of a VHD differencing disk (what
// vhd-util coalesce does, then the child emptied as qemu-img commit
// leaves an overlay; with -d the child is left as it is). qemu-img's vpc
// driver does not follow a VHD chain, so libvhdi's vhdimount, which does,
// reads the child before and after; qemu-img compare finds the parent,
// a plain dynamic VHD to it, equal to that content; our check and
// vhdiinfo accept both files.
func TestImageCommitVHD(t *testing.T) {
	bin := imageBinary(t)
	qi := oracle.Require(t, "qemu-img")
	vi := oracle.Require(t, "vhdiinfo")
	for _, drop := range []bool{false, true} {
		name := "emptied"
		if drop {
			name = "drop"
		}
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			vhdChainFixture(t, dir, bin)
			want := oracle.VHDIMount(t, filepath.Join(dir, "child.vhd"))
			if err := os.WriteFile(filepath.Join(dir, "want.raw"), want, 0o644); err != nil {
				t.Fatal(err)
			}
			childBefore, _ := os.ReadFile(filepath.Join(dir, "child.vhd"))
			args := []string{"image", "commit", "child.vhd"}
			if drop {
				args = []string{"image", "commit", "-d", "child.vhd"}
			}
			if so, se, rc := runIn(t, dir, bin, args...); rc != 0 || so != "Image committed.\n" {
				t.Fatalf("commit: exit %d: %q %s", rc, so, se)
			}
			if out, _, rc := runIn(t, dir, qi, "compare", "-f", "vpc", "-F", "raw", "base.vhd", "want.raw"); rc != 0 {
				t.Errorf("qemu-img compare of the parent with the child's old content: %s", out)
			}
			if got := oracle.VHDIMount(t, filepath.Join(dir, "child.vhd")); !bytes.Equal(got, want) {
				t.Error("vhdimount reads the child differently after the commit")
			}
			for _, f := range []string{"base.vhd", "child.vhd"} {
				mustRun(t, dir, bin, "image", "check", f)
				mustRun(t, dir, vi, f)
			}
			childAfter, _ := os.ReadFile(filepath.Join(dir, "child.vhd"))
			if drop != bytes.Equal(childBefore, childAfter) {
				t.Errorf("-d %v: child unchanged %v", drop, !drop)
			}
			if own := len(ownRanges(t, filepath.Join(dir, "child.vhd"))) > 0; own != drop {
				t.Errorf("-d %v: child holds data %v", drop, own)
			}
		})
	}
}

// TestImageCommitVHDDeeper: `image commit -b base.vhd top.vhd` over
// base.vhd <- mid.vhd <- top.vhd writes what top and mid hold into base
// (-b implies -d: top and mid are left as they are); qemu-img compare
// finds base equal to what top read before, through vhdimount.
func TestImageCommitVHDDeeper(t *testing.T) {
	bin := imageBinary(t)
	qi := oracle.Require(t, "qemu-img")
	dir := t.TempDir()
	vhdChainFixture(t, dir, bin)
	if err := os.Rename(filepath.Join(dir, "child.vhd"), filepath.Join(dir, "mid.vhd")); err != nil {
		t.Fatal(err)
	}
	mustRun(t, dir, bin, "image", "create", "-f", "vhd", "-b", "mid.vhd", "-F", "vhd", "top.vhd")
	var open image.OpenFunc
	open = func(name, _ string) (image.Image, error) {
		return vhd.Open(filepath.Join(dir, name), vhd.Options{ReadOnly: true, Backing: open})
	}
	top, err := vhd.Open(filepath.Join(dir, "top.vhd"), vhd.Options{Backing: open})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := top.WriteAt(bytes.Repeat([]byte{0x66}, 100<<10), 2<<20+512); err != nil {
		t.Fatal(err)
	}
	if err := top.Close(); err != nil {
		t.Fatal(err)
	}
	want := oracle.VHDIMount(t, filepath.Join(dir, "top.vhd"))
	if err := os.WriteFile(filepath.Join(dir, "want.raw"), want, 0o644); err != nil {
		t.Fatal(err)
	}
	before := map[string][]byte{}
	for _, f := range []string{"mid.vhd", "top.vhd"} {
		before[f], _ = os.ReadFile(filepath.Join(dir, f))
	}
	if so, se, rc := runIn(t, dir, bin, "image", "commit", "-b", "base.vhd", "top.vhd"); rc != 0 || so != "Image committed.\n" {
		t.Fatalf("commit -b: exit %d: %q %s", rc, so, se)
	}
	if out, _, rc := runIn(t, dir, qi, "compare", "-f", "vpc", "-F", "raw", "base.vhd", "want.raw"); rc != 0 {
		t.Errorf("qemu-img compare of base.vhd with top's old content: %s", out)
	}
	for f, b := range before {
		if after, _ := os.ReadFile(filepath.Join(dir, f)); !bytes.Equal(after, b) {
			t.Errorf("%s changed", f)
		}
	}
	mustRun(t, dir, bin, "image", "check", "base.vhd")
}

// vhdChainFixture makes base.vhd (data in its first MiB) and child.vhd
// over it with data of its own: partial blocks and sectors over base's
// data, and a whole block.
func vhdChainFixture(t *testing.T, dir, bin string) {
	t.Helper()
	mustRun(t, dir, bin, "image", "create", "-f", "vhd", "-o", "block_size=524288", "base.vhd", "4M")
	mustRun(t, dir, bin, "image", "create", "-f", "vhd", "-b", "base.vhd", "-F", "vhd", "child.vhd")
	write := func(path string, opener image.OpenFunc, off, n int64, fill byte) {
		img, err := vhd.Open(path, vhd.Options{Backing: opener})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := img.WriteAt(bytes.Repeat([]byte{fill}, int(n)), off); err != nil {
			t.Fatal(err)
		}
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
	}
	base := filepath.Join(dir, "base.vhd")
	write(base, nil, 0, 1<<20, 0x11)
	parent := func(string, string) (image.Image, error) {
		return vhd.Open(base, vhd.Options{ReadOnly: true})
	}
	child := filepath.Join(dir, "child.vhd")
	write(child, parent, 1000, 3000, 0x22)
	write(child, parent, 700<<10, 1<<20, 0x33)
	write(child, parent, 3<<20, 512<<10, 0x44)
}

// TestImageRebaseVHD: `image rebase` of a VHD differencing disk onto
// another VHD, safe (the child reads the same, through libvhdi's
// vhdimount, which follows the new chain) and with -u (only the names
// change: the child's own sectors over the new parent). vhdiinfo and
// `image info` name the new parent; check accepts the child.
func TestImageRebaseVHD(t *testing.T) {
	bin := imageBinary(t)
	vi := oracle.Require(t, "vhdiinfo")
	for _, unsafe := range []bool{false, true} {
		t.Run(fmt.Sprintf("unsafe=%v", unsafe), func(t *testing.T) {
			dir := t.TempDir()
			vhdChainFixture(t, dir, bin)
			mustRun(t, dir, bin, "image", "create", "-f", "vhd", "-o", "block_size=524288", "other.vhd", "4M")
			other := filepath.Join(dir, "other.vhd")
			img, err := vhd.Open(other, vhd.Options{})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := img.WriteAt(bytes.Repeat([]byte{0x55}, 2<<20), 512<<10); err != nil {
				t.Fatal(err)
			}
			img.Close()
			child := filepath.Join(dir, "child.vhd")
			want := oracle.VHDIMount(t, child)
			args := []string{"image", "rebase", "-b", "other.vhd", "-F", "vpc", "child.vhd"}
			if unsafe {
				// The child's own sectors over the new parent.
				own := ownRanges(t, child)
				next := oracle.VHDIMount(t, other)
				for _, e := range own {
					copy(next[e.Offset:e.Offset+e.Length], want[e.Offset:])
				}
				want = next
				args = []string{"image", "rebase", "-u", "-b", "other.vhd", "-F", "vpc", "child.vhd"}
			}
			mustRun(t, dir, bin, args...)
			if got := oracle.VHDIMount(t, child); !bytes.Equal(got, want) {
				t.Error("vhdimount reads the rebased child differently")
			}
			if out, _, _ := runIn(t, dir, vi, "child.vhd"); !strings.Contains(out, "other.vhd") {
				t.Errorf("vhdiinfo does not name other.vhd:\n%s", out)
			}
			if out, _, _ := runIn(t, dir, bin, "image", "info", "child.vhd"); !strings.Contains(out, "backing file: other.vhd") {
				t.Errorf("image info:\n%s", out)
			}
			mustRun(t, dir, bin, "image", "check", "child.vhd")
		})
	}
}

// ownRanges is what the VHD child at path holds itself.
func ownRanges(t *testing.T, path string) []image.Extent {
	t.Helper()
	img, err := vhd.Open(path, vhd.Options{ReadOnly: true, SkipParent: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	exts, err := img.Map(0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	var own []image.Extent
	for _, e := range exts {
		if e.Depth == 0 {
			own = append(own, e)
		}
	}
	return own
}

// TestImageResizeVHDPastBAT: a dynamic VHD with data grows far past what
// its BAT can name (the BAT and batmap are laid out anew, the blocks in
// their way moved): qemu-img reads the old data and zeros after it, and a
// block written past the old end afterwards; vhdiinfo reads the new size;
// check accepts it.
func TestImageResizeVHDPastBAT(t *testing.T) {
	bin := imageBinary(t)
	qi := oracle.Require(t, "qemu-img")
	vi := oracle.Require(t, "vhdiinfo")
	dir := t.TempDir()
	mustRun(t, dir, bin, "image", "create", "-f", "vhd", "-o", "block_size=524288", "d.vhd", "1M")
	p := filepath.Join(dir, "d.vhd")
	const size = 300 << 20 // 600 entries: a BAT of five sectors
	want := make([]byte, size)
	for i := range 1 << 20 {
		want[i] = byte(i*7 + i>>9)
	}
	writeVHD := func(off, n int64) {
		img, err := vhd.Open(p, vhd.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := img.WriteAt(want[off:off+n], off); err != nil {
			t.Fatal(err)
		}
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
	}
	writeVHD(0, 1<<20)
	mustRun(t, dir, bin, "image", "resize", "d.vhd", "300M")
	copy(want[299<<20:], bytes.Repeat([]byte{0x5a}, 4096))
	writeVHD(299<<20, 4096)
	if err := os.WriteFile(filepath.Join(dir, "want.raw"), want, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, _, rc := runIn(t, dir, qi, "compare", "-f", "vpc", "-F", "raw", "d.vhd", "want.raw"); rc != 0 {
		t.Errorf("qemu-img compare after the grow: %s", out)
	}
	if out, _, _ := runIn(t, dir, vi, "d.vhd"); !strings.Contains(out, fmt.Sprintf("(%d bytes)", size)) {
		t.Errorf("vhdiinfo:\n%s", out)
	}
	mustRun(t, dir, bin, "image", "check", "d.vhd")
}
