package main

import (
	"bytes"
	"os"
	"path/filepath"
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
			if own := childOwnsData(t, dir); own != drop {
				t.Errorf("-d %v: child holds data %v", drop, own)
			}
		})
	}
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

// childOwnsData says whether child.vhd, opened over base.vhd, maps any
// range at depth 0.
func childOwnsData(t *testing.T, dir string) bool {
	t.Helper()
	base := filepath.Join(dir, "base.vhd")
	img, err := vhd.Open(filepath.Join(dir, "child.vhd"), vhd.Options{ReadOnly: true,
		Backing: func(string, string) (image.Image, error) { return vhd.Open(base, vhd.Options{ReadOnly: true}) }})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	exts, err := img.Map(0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range exts {
		if e.Depth == 0 {
			return true
		}
	}
	return false
}
