package vhd

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
)

func TestCreateRefusals(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "x.vhd")
	err := Create(p, CreateOptions{Size: 2041 << 30})
	if err == nil || !errors.Is(err, image.ErrUnsupported) || !strings.Contains(err.Error(), "qcow2") {
		t.Fatalf("2041 GiB: %v", err)
	}
	if err := Create(p, CreateOptions{Size: MaxSize}); err != nil {
		t.Fatalf("2040 GiB: %v", err)
	}
	if fi, _ := os.Stat(p); fi.Size() > 16<<20 {
		t.Fatalf("a 2040 GiB dynamic disk takes %d bytes", fi.Size())
	}
	for _, o := range []CreateOptions{
		{Size: 1 << 20, Subformat: "sparse"},
		{Size: 0},
		{Size: 1 << 20, BlockSize: 3000},
		{Size: 1 << 20, Subformat: "fixed", Backing: "x.vhd"},
		{Backing: "x.vhd", BackingFormat: "qcow2"},
		{Backing: "missing.vhd"},
	} {
		if err := Create(filepath.Join(dir, "bad.vhd"), o); err == nil {
			t.Errorf("Create(%+v) succeeded", o)
		}
		if _, err := os.Stat(filepath.Join(dir, "bad.vhd")); err == nil {
			t.Fatalf("Create(%+v) left a file behind", o)
		}
	}
	// Sizes round up to whole sectors.
	q := filepath.Join(dir, "odd.vhd")
	if err := Create(q, CreateOptions{Size: 1000, Subformat: "fixed"}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(q, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if img.Size() != 1024 {
		t.Fatalf("size %d", img.Size())
	}
	if _, err := img.WriteAt([]byte{1}, 0); !errors.Is(err, image.ErrReadOnly) {
		t.Fatalf("write to read-only: %v", err)
	}
	if _, err := img.ReadAt(make([]byte, 2), 1023); !errors.Is(err, image.ErrOutOfRange) {
		t.Fatalf("read past the end: %v", err)
	}
	img.Close()
	if _, err := img.ReadAt(make([]byte, 2), 0); !errors.Is(err, image.ErrClosed) {
		t.Fatalf("read after close: %v", err)
	}
	if _, err := Open(filepath.Join(dir, "missing.vhd"), Options{}); err == nil {
		t.Fatal("opened a missing file")
	}
	raw := filepath.Join(dir, "raw.img")
	os.WriteFile(raw, make([]byte, 4096), 0o644)
	if _, err := Open(raw, Options{}); !errors.Is(err, image.ErrWrongFormat) {
		t.Fatalf("raw file: %v", err)
	}
}

func TestDetect(t *testing.T) {
	f, _ := memImage(t, CreateOptions{Size: 1 << 20}, nil)
	b := f.Bytes()
	if !Detect(b[:512]) || !DetectTail(b[len(b)-512:]) {
		t.Fatal("dynamic disk not detected")
	}
	fx, _ := memImage(t, CreateOptions{Size: 1 << 20, Subformat: "fixed"}, nil)
	b = fx.Bytes()
	if Detect(b[:512]) || !DetectTail(b[len(b)-512:]) {
		t.Fatal("fixed disk: Detect must not see it at offset 0, DetectTail must")
	}
	if Detect(make([]byte, 512)) || DetectTail(make([]byte, 100)) {
		t.Fatal("zeros detected as VHD")
	}
}

// TestDiscardDynamic: a discarded range reads as zeros, shows as a hole,
// and its block stays allocated (VHD has no free list to return it to).
func TestDiscardDynamic(t *testing.T) {
	f, img := memImage(t, CreateOptions{Size: 8 << 20}, nil)
	b := make([]byte, 3<<20)
	pattern(b, 1)
	img.WriteAt(b, 1<<20)
	if err := img.Discard(1<<20+1000, 2<<20); err != nil {
		t.Fatal(err)
	}
	clear(b[1000 : 1000+2<<20])
	got := make([]byte, 3<<20)
	img.ReadAt(got, 1<<20)
	mustEqual(t, "after discard", got, b)
	ext, _ := img.Map(0, 8<<20)
	holes := int64(0)
	for _, x := range ext {
		if x.Kind == image.Hole {
			holes += x.Length
		}
	}
	// 5 MiB never written, plus the whole sectors inside the discard.
	if want := int64(5<<20) + (2<<20 - 512); holes != want {
		t.Fatalf("holes %d bytes, want %d: %+v", holes, want, ext)
	}
	if r, err := checkFile(f, "x", CheckOptions{}); err != nil || !r.OK() {
		t.Fatalf("check: %+v %v", r, err)
	}
}

// TestMapFixed: a fresh fixed disk is one sparse hole (Zero); written
// ranges show as Data, and Map covers the range exactly.
func TestMapFixed(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f.vhd")
	const size = 8 << 20
	if err := Create(p, CreateOptions{Size: size, Subformat: "fixed"}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if _, err := img.WriteAt(make([]byte, 8192), 1<<20); err != nil {
		t.Fatal(err)
	}
	ext, err := img.Map(0, size)
	if err != nil {
		t.Fatal(err)
	}
	var sum, data int64
	for _, x := range ext {
		if x.Offset != sum {
			t.Fatalf("gap before %+v", x)
		}
		sum += x.Length
		if x.Kind == image.Data {
			data += x.Length
			if x.Offset > 1<<20 || x.Offset+x.Length < 1<<20+8192 {
				t.Fatalf("data extent %+v misses the write", x)
			}
		}
	}
	if sum != size || data == 0 || data > 1<<20 {
		t.Fatalf("map: %+v", ext)
	}
}
