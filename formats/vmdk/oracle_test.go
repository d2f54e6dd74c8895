package vmdk

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/imagetest"
	"github.com/blktap-go/blktap/internal/oracle"
)

func run(t *testing.T, prog string, args ...string) string {
	t.Helper()
	return oracle.Run(t, prog, args...)
}

// opener opens parents relative to dir, read-only, the way the lead's
// dispatcher does.
func opener(dir string) image.OpenFunc {
	var f image.OpenFunc
	f = func(name, format string) (image.Image, error) {
		if format != "vmdk" {
			return nil, image.ErrUnsupported
		}
		return Open(filepath.Join(dir, name), Options{ReadOnly: true, Backing: f})
	}
	return f
}

// toRaw converts any image qemu reads to raw bytes.
func toRaw(t *testing.T, path, format string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.raw")
	args := []string{"convert", "-O", "raw", path, out}
	if format != "" {
		args = []string{"convert", "-f", format, "-O", "raw", path, out}
	}
	run(t, "qemu-img", args...)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func readAll(t *testing.T, img image.Image) []byte {
	t.Helper()
	b := make([]byte, img.Size())
	// Odd-sized chunks cross grain and extent boundaries.
	for off := int64(0); off < img.Size(); {
		n := min(int64(100000), img.Size()-off)
		if _, err := img.ReadAt(b[off:off+n], off); err != nil {
			t.Fatalf("ReadAt(%d, %d): %v", off, n, err)
		}
		off += n
	}
	return b
}

// qemuParent makes base.vmdk of size, filled with 0xaa by qemu-io, in a
// fresh directory, and names child.vmdk beside it.
func qemuParent(t *testing.T, size string) (base, child string) {
	t.Helper()
	dir := t.TempDir()
	base, child = filepath.Join(dir, "base.vmdk"), filepath.Join(dir, "child.vmdk")
	run(t, "qemu-img", "create", "-q", "-f", "vmdk", base, size)
	run(t, "qemu-io", "-f", "vmdk", "-c", "write -P 0xaa 0 "+size, base)
	return base, child
}

// openReading opens p read-only, closed when the test ends, and fails t
// unless it reads want.
func openReading(t *testing.T, p string, want []byte) *Image {
	t.Helper()
	img, err := Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	if got := readAll(t, img); !bytes.Equal(got, want) {
		t.Fatalf("differs at %d", imagetest.FirstDiff(got, want))
	}
	return img
}

// patternRaw writes a raw file of size bytes: random runs, a zero run
// inside allocated space, holes.
func patternRaw(t *testing.T, path string, size int64, seed uint64) []byte {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, size)
	for range 12 {
		off := r.Int64N(size)
		n := min(r.Int64N(200<<10)+1, size-off)
		for i := off; i < off+n; i++ {
			b[i] = byte(r.Uint32())
		}
	}
	copy(b[size-3:], "end")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestReadQemuSubformats: every subformat qemu-img writes reads identically
// through our code.
func TestReadQemuSubformats(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	want := patternRaw(t, src, 6<<20+4096, 1)
	for _, tc := range []struct{ name, opts string }{
		{"monolithicSparse", "subformat=monolithicSparse"},
		{"monolithicFlat", "subformat=monolithicFlat"},
		{"twoGbMaxExtentSparse", "subformat=twoGbMaxExtentSparse"},
		{"twoGbMaxExtentFlat", "subformat=twoGbMaxExtentFlat"},
		{"streamOptimized", "subformat=streamOptimized"},
		{"zeroedGrain", "zeroed_grain=on"},
		{"lsilogic", "adapter_type=lsilogic,hwversion=6"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, tc.name+".vmdk")
			run(t, "qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", tc.opts, src, p)
			img, err := Open(p, Options{ReadOnly: true})
			if err != nil {
				b, _ := os.ReadFile(p)
				t.Fatalf("%v\n%q", err, b)
			}
			defer img.Close()
			if got := readAll(t, img); !bytes.Equal(got, want) {
				t.Fatalf("differs from the source at byte %d", imagetest.FirstDiff(got, want))
			}
			if ci := img.Info(); ci.CreateType != tc.name && !strings.HasPrefix(tc.opts, "zeroed") && !strings.HasPrefix(tc.opts, "adapter") {
				t.Errorf("create type %q", ci.CreateType)
			}
			checkMapCovers(t, img, want)
		})
	}
}

// checkMapCovers: Map covers the image in order, and everything outside
// data extents reads as zeros.
func checkMapCovers(t *testing.T, img image.Image, want []byte) {
	t.Helper()
	for _, x := range imagetest.MapAll(t, img) {
		if x.Kind != image.Data {
			if i := imagetest.FirstDiff(want[x.Offset:x.Offset+x.Length], make([]byte, x.Length)); i >= 0 {
				t.Fatalf("%v extent %+v holds data at +%d", x.Kind, x, i)
			}
		}
	}
}

// TestReadQemuLarge: qemu's twoGb* layouts split a 5 GiB disk in three
// extents; data written by qemu-io across the 2 GiB boundaries reads back.
func TestReadQemuLarge(t *testing.T) {
	dir := t.TempDir()
	for _, sub := range []string{"twoGbMaxExtentSparse", "twoGbMaxExtentFlat"} {
		t.Run(sub, func(t *testing.T) {
			p := filepath.Join(dir, sub+".vmdk")
			run(t, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat="+sub, p, "5G")
			offs := []int64{0, 2<<30 - 4096, 4<<30 - 70000, 5<<30 - 70000}
			var cmds []string
			for i, o := range offs {
				cmds = append(cmds, "-c", "write -P "+itoa(0x11+i)+" "+itoa64(o)+" 70000")
			}
			run(t, "qemu-io", append(append([]string{"-f", "vmdk"}, cmds...), p)...)
			img, err := Open(p, Options{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if len(img.Info().Extents) != 3 {
				t.Fatalf("extents: %+v", img.Info().Extents)
			}
			for i, o := range offs {
				n := min(int64(70000), img.Size()-o)
				buf := make([]byte, n+8192)
				start := max(0, o-4096)
				buf = buf[:min(int64(len(buf)), img.Size()-start)]
				if _, err := img.ReadAt(buf, start); err != nil {
					t.Fatal(err)
				}
				for k, c := range buf {
					at := start + int64(k)
					var w byte
					if at >= o && at < o+n {
						w = byte(0x11 + i)
					}
					if c != w {
						t.Fatalf("byte %d = %#x, want %#x", at, c, w)
					}
				}
			}
		})
	}
}

func itoa(i int) string     { return itoa64(int64(i)) }
func itoa64(i int64) string { return strings.TrimSpace(strings.Replace(jsonNum(i), "\n", "", -1)) }
func jsonNum(i int64) string {
	b, _ := json.Marshal(i)
	return string(b)
}

// TestReadQemuChain: a child qemu made over a parent, written by qemu-io in
// partial grains, reads like qemu's own raw conversion.
func TestReadQemuChain(t *testing.T) {
	base, child := qemuParent(t, "4M")
	run(t, "qemu-img", "create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", child)
	run(t, "qemu-io", "-f", "vmdk", "-c", "write -P 0x55 1000 3000", "-c", "write -P 0x66 1M 64k", child)
	want := toRaw(t, child, "vmdk")
	if _, err := Open(child, Options{ReadOnly: true}); err == nil {
		t.Fatal("opened a child without a backing opener")
	}
	img, err := Open(child, Options{ReadOnly: true, Backing: opener(filepath.Dir(base))})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if name, f := img.BackingFile(); name != "base.vmdk" || f != "vmdk" {
		t.Fatalf("backing %q %q", name, f)
	}
	if got := readAll(t, img); !bytes.Equal(got, want) {
		t.Fatalf("differs at %d", imagetest.FirstDiff(got, want))
	}
	ext, err := img.Map(0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	var depth0, depth1 int64
	for _, x := range ext {
		switch x.Depth {
		case 0:
			depth0 += x.Length
		case 1:
			depth1 += x.Length
		}
	}
	if depth0 != 128<<10 || depth1 != 4<<20-128<<10 {
		t.Fatalf("depths: %d at 0, %d at 1: %+v", depth0, depth1, ext)
	}
}

// TestReadQemuZeroWrites: qemu-io write -z on a zeroed-grain image leaves
// GTE 1 entries, which read as zeros and map as zero.
func TestReadQemuZeroWrites(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "z.vmdk")
	run(t, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", p, "4M")
	run(t, "qemu-io", "-f", "vmdk", "-c", "write -P 0x77 0 1M", "-c", "write -z 128k 256k", p)
	img := openReading(t, p, toRaw(t, p, "vmdk"))
	ext, _ := img.Map(0, img.Size())
	var zero int64
	for _, x := range ext {
		if x.Kind == image.Zero {
			zero += x.Length
		}
	}
	if zero != 256<<10 {
		t.Fatalf("zero extents total %d: %+v", zero, ext)
	}
}

// vmdkMount reads an image through libvmdk's FUSE mount (vmdkmount), an
// independent reader. It skips where FUSE is unavailable outside CI.
func vmdkMount(t *testing.T, path string) []byte {
	t.Helper()
	prog := oracle.Require(t, "vmdkmount")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		if oracle.InCI() {
			t.Fatal("vmdkmount needs /dev/fuse")
		}
		t.Skip("no /dev/fuse")
	}
	mnt := t.TempDir()
	cmd := exec.Command(prog, "-v", path, mnt)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	defer func() {
		exec.Command("umount", mnt).Run()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	}()
	f := filepath.Join(mnt, "vmdk1")
	for i := 0; ; i++ {
		if _, err := os.Stat(f); err == nil {
			break
		}
		select {
		case err := <-done:
			done <- err
			t.Fatalf("vmdkmount %s exited: %v\n%s", path, err, stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
		if i > 500 {
			t.Fatalf("vmdkmount %s: no vmdk1 after 10 s\n%s", path, stderr.String())
		}
	}
	b, err := os.ReadFile(f)
	if err != nil {
		t.Fatalf("read through vmdkmount: %v\n%s", err, stderr.String())
	}
	return b
}
