package vhd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/imagetest"
)

var updateTestdata = flag.Bool("update-testdata", false, "rewrite testdata/*.vhd seed images")

// seedImages builds the seed corpus: small good images of each type and
// crafted bad ones, each named for its fault.
func seedImages(t testing.TB) map[string][]byte {
	const size = 32 << 10
	dyn := seedImage(t, CreateOptions{Size: size, BlockSize: 4096}, 0, 9000, size-1000)
	out := map[string][]byte{
		"vhd-dynamic-good.vhd": dyn,
		"vhd-fixed-good.vhd":   seedImage(t, CreateOptions{Size: 8192, Subformat: "fixed"}),
	}
	// A differencing child (its parent is not in the corpus).
	plan, _ := planCreate("/nonexistent/c.vhd", CreateOptions{Size: size, BlockSize: 4096, Now: func() time.Time { return time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC) }})
	plan.foot.Type = typeDiff
	copy(plan.hdr.ParentName[:], encodeUTF16("parent.vhd", true))
	cf := newCrashFile(nil)
	plan.write(cf)
	out["vhd-differencing-good.vhd"] = cf.Bytes()

	seedDynamicFaults(out, dyn)
	seedOtherFaults(out)
	return out
}

// seedImage creates an image with opts in memory and writes 1000 bytes of
// byte(off) at each of writes.
func seedImage(t testing.TB, opts CreateOptions, writes ...int64) []byte {
	f, img := memImage(t, opts, nil)
	for _, off := range writes {
		b := bytes.Repeat([]byte{byte(off)}, 1000)
		if _, err := img.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	return f.Bytes()
}

// resumFooter and resumHeader recompute the checksum of the footer at
// off and of the dynamic header after a crafted change.
func resumFooter(b []byte, off int) {
	be := binary.BigEndian
	be.PutUint32(b[off+64:], 0)
	be.PutUint32(b[off+64:], checksum(b[off:off+512], 64))
}

func resumHeader(b []byte) {
	be := binary.BigEndian
	be.PutUint32(b[512+36:], 0)
	be.PutUint32(b[512+36:], checksum(b[512:1536], 36))
}

// seedDynamicFaults adds the faults crafted on a copy of the good dynamic
// image dyn.
func seedDynamicFaults(out map[string][]byte, dyn []byte) {
	be := binary.BigEndian
	mut := func(name string, f func(b []byte) []byte) {
		b := f(append([]byte(nil), dyn...))
		out[name] = b
	}
	end := len(dyn) - 512
	mut("vhd-footer-bad-checksum.vhd", func(b []byte) []byte { b[end+50] ^= 1; b[50] ^= 1; return b })
	mut("vhd-header-bad-checksum.vhd", func(b []byte) []byte { b[512+30] ^= 1; return b })
	mut("vhd-huge-max-table-entries.vhd", func(b []byte) []byte { be.PutUint32(b[512+28:], 0xFFFFFFF0); resumHeader(b); return b })
	mut("vhd-block-size-not-power-of-two.vhd", func(b []byte) []byte { be.PutUint32(b[512+32:], 3000); resumHeader(b); return b })
	mut("vhd-bat-past-eof.vhd", func(b []byte) []byte { be.PutUint32(b[1536:], 0x00FFFFFF); return b })
	mut("vhd-block-clobbers-header.vhd", func(b []byte) []byte { be.PutUint32(b[1536:], 1); return b })
	mut("vhd-overlapping-blocks.vhd", func(b []byte) []byte { copy(b[1536+8:], b[1536:1540]); return b })
	// The BAT over the dynamic header: allocating block 0 would
	// overwrite the header's first bytes.
	mut("vhd-bat-over-header.vhd", func(b []byte) []byte { be.PutUint64(b[512+16:], 512); resumHeader(b); return b })
	mut("vhd-table-offset-past-eof.vhd", func(b []byte) []byte { be.PutUint64(b[512+16:], 1<<40); resumHeader(b); return b })
	mut("vhd-table-offset-negative.vhd", func(b []byte) []byte { be.PutUint64(b[512+16:], 0xffff000000000600); resumHeader(b); return b })
	mut("vhd-data-offset-past-eof.vhd", func(b []byte) []byte {
		for _, o := range []int{0, end} {
			be.PutUint64(b[o+16:], 1<<40)
			resumFooter(b, o)
		}
		return b
	})
	mut("vhd-unknown-disk-type.vhd", func(b []byte) []byte {
		for _, o := range []int{0, end} {
			be.PutUint32(b[o+60:], 7)
			resumFooter(b, o)
		}
		return b
	})
	mut("vhd-primary-footer-lost.vhd", func(b []byte) []byte { clear(b[end:]); return b })
	mut("vhd-truncated.vhd", func(b []byte) []byte { return b[:2000] })
	mut("vhd-size-beyond-bat.vhd", func(b []byte) []byte {
		for _, o := range []int{0, end} {
			be.PutUint64(b[o+48:], 1<<40)
			resumFooter(b, o)
		}
		return b
	})
}

// seedOtherFaults adds the faults crafted on the good fixed and
// differencing images.
func seedOtherFaults(out map[string][]byte) {
	be := binary.BigEndian
	fixed := out["vhd-fixed-good.vhd"]
	fb := append([]byte(nil), fixed...)
	be.PutUint64(fb[len(fb)-512+48:], 1<<30)
	resumFooter(fb, len(fb)-512)
	out["vhd-fixed-size-larger-than-file.vhd"] = fb
	diff := append([]byte(nil), out["vhd-differencing-good.vhd"]...)
	be.PutUint32(diff[512+576:], platW2ru)
	be.PutUint32(diff[512+576+4:], 1)
	be.PutUint32(diff[512+576+8:], 100)
	be.PutUint64(diff[512+576+16:], 1<<33)
	resumHeader(diff)
	out["vhd-locator-past-eof.vhd"] = diff
	// A locator stored over the BAT: a BAT update would rewrite the
	// parent's name.
	lob := append([]byte(nil), out["vhd-differencing-good.vhd"]...)
	be.PutUint32(lob[512+576:], platW2ru)
	be.PutUint32(lob[512+576+4:], 1)
	be.PutUint32(lob[512+576+8:], 20)
	be.PutUint64(lob[512+576+16:], 1536)
	resumHeader(lob)
	out["vhd-locator-over-bat.vhd"] = lob
}

// TestTestdataCurrent keeps testdata/ equal to what seedImages builds
// (run with -update-testdata after changing it).
func TestTestdataCurrent(t *testing.T) {
	for name, b := range seedImages(t) {
		got := imagetest.Stored(t, name, b, *updateTestdata, "go test -run TestTestdataCurrent -update-testdata")
		if got == nil {
			continue
		}
		// UUIDs are random; compare everything else.
		if len(got) != len(b) {
			t.Errorf("%s: %d bytes, generator makes %d", name, len(got), len(b))
		}
	}
}

// TestBadImages: each crafted fault gives a clear, classed error (or is
// reported by Check), never a panic.
func TestBadImages(t *testing.T) {
	want := map[string]error{
		"vhd-footer-bad-checksum.vhd":         image.ErrCorrupt,
		"vhd-header-bad-checksum.vhd":         image.ErrCorrupt,
		"vhd-huge-max-table-entries.vhd":      image.ErrCorrupt,
		"vhd-block-size-not-power-of-two.vhd": image.ErrCorrupt,
		"vhd-bat-past-eof.vhd":                image.ErrCorrupt,
		"vhd-block-clobbers-header.vhd":       image.ErrCorrupt,
		"vhd-overlapping-blocks.vhd":          image.ErrCorrupt,
		"vhd-bat-over-header.vhd":             image.ErrCorrupt,
		"vhd-locator-over-bat.vhd":            image.ErrCorrupt,
		"vhd-table-offset-past-eof.vhd":       image.ErrCorrupt,
		"vhd-data-offset-past-eof.vhd":        image.ErrCorrupt,
		"vhd-table-offset-negative.vhd":       image.ErrCorrupt,
		"vhd-unknown-disk-type.vhd":           image.ErrUnsupported,
		"vhd-size-beyond-bat.vhd":             image.ErrCorrupt,
		"vhd-fixed-size-larger-than-file.vhd": image.ErrCorrupt,
		"vhd-truncated.vhd":                   image.ErrCorrupt,
	}
	for name, class := range want {
		b := imagetest.Testdata(t, name)
		_, err := openFile(newCrashFile(b), name, Options{ReadOnly: true, Logger: discardLogger()})
		if !imagetest.Classed(t, name, err, class) {
			continue
		}
		if res, cerr := checkFile(newCrashFile(b), name, CheckOptions{}); cerr == nil && res.OK() {
			t.Errorf("%s: Check finds nothing wrong", name)
		}
	}
	// Recoverable: the footer copy stands in, Check says so, Repair fixes.
	b, _ := os.ReadFile("testdata/vhd-primary-footer-lost.vhd")
	f := newCrashFile(b)
	if res, _ := checkFile(f, "x", CheckOptions{}); res.OK() || !strings.Contains(strings.Join(res.Corruptions, ";"), "primary footer") {
		t.Fatalf("check of a lost footer: %+v", res)
	}
	if res, err := checkFile(f, "x", CheckOptions{Repair: true}); err != nil || !res.OK() || len(res.Repaired) == 0 {
		t.Fatalf("repair: %+v %v", res, err)
	}
	if res, _ := checkFile(f, "x", CheckOptions{}); !res.OK() {
		t.Fatalf("after repair: %+v", res)
	}
	// A differencing disk whose locator points past the end still opens
	// by its parent name, and Check reports the locator.
	b, _ = os.ReadFile("testdata/vhd-locator-past-eof.vhd")
	if res, _ := checkFile(newCrashFile(b), "x", CheckOptions{}); res.OK() {
		t.Fatal("check misses a locator past EOF")
	}
}

func FuzzOpen(f *testing.F) {
	ents, _ := os.ReadDir("testdata")
	for _, e := range ents {
		if b, err := os.ReadFile(filepath.Join("testdata", e.Name())); err == nil && strings.HasSuffix(e.Name(), ".vhd") {
			f.Add(b)
		}
	}
	f.Fuzz(fuzzOpen)
}

func fuzzOpen(t *testing.T, data []byte) {
	{
		open := func(string, string) (image.Image, error) { return sharedParent{fuzzParent()}, nil }
		img, err := openFile(newCrashFile(data), "fuzz.vhd", Options{ReadOnly: true, Backing: open, Logger: discardLogger()})
		if err != nil {
			if !errors.Is(err, image.ErrCorrupt) && !errors.Is(err, image.ErrUnsupported) && !errors.Is(err, image.ErrWrongFormat) {
				t.Fatalf("unclassed error: %v", err)
			}
		} else {
			n := min(img.Size(), 1<<16)
			buf := make([]byte, n)
			img.ReadAt(buf, 0)
			img.ReadAt(buf, img.Size()-n)
			img.Map(0, img.Size())
			_ = img.Info()
			img.Close()
		}
		checkFile(newCrashFile(data), "fuzz.vhd", CheckOptions{Backing: open})
		// Footers that parse re-encode to the same bytes.
		if len(data) >= footerSize {
			if ft, err := parseFooter(data[:footerSize], 0); err == nil && checksum(data[:footerSize], 64) == ft.Checksum {
				if got := ft.encode(); !bytes.Equal(got, data[:footerSize]) {
					t.Fatalf("footer round trip differs")
				}
			}
		}
	}
}

var fuzzParent = sync.OnceValue(func() image.Image {
	plan, err := planCreate("/nonexistent/p.vhd", CreateOptions{Size: 1 << 20, BlockSize: 4096})
	if err != nil {
		panic(err)
	}
	f := newCrashFile(nil)
	plan.write(f)
	img, err := openFile(f, "p.vhd", Options{ReadOnly: true, Logger: discardLogger()})
	if err != nil {
		panic(err)
	}
	return img
})

// sharedParent hides UUID so any child accepts it, and Close.
type sharedParent struct{ image.Image }

func (sharedParent) Close() error { return nil }

// FuzzFooterHeader: the footer and dynamic header parsers on raw bytes;
// whatever parses re-encodes to the same bytes.
func FuzzFooterHeader(f *testing.F) {
	ents, _ := os.ReadDir("testdata")
	for _, e := range ents {
		if b, err := os.ReadFile(filepath.Join("testdata", e.Name())); err == nil && len(b) >= 1536 {
			f.Add(b[:1536])
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < footerSize {
			return
		}
		if ft, err := parseFooter(b[:footerSize], 0); err == nil && checksum(b[:footerSize], 64) == ft.Checksum {
			if !bytes.Equal(ft.encode(), b[:footerSize]) {
				t.Fatal("footer round trip differs")
			}
			_, _ = ft.virtualSize()
		}
		if len(b) < footerSize+headerSize {
			return
		}
		h, err := parseHeader(b[footerSize:footerSize+headerSize], footerSize)
		if err != nil {
			var fe *image.FormatError
			if !errors.As(err, &fe) {
				t.Fatalf("unclassed error %v", err)
			}
			return
		}
		if !bytes.Equal(h.encode(), b[footerSize:footerSize+headerSize]) {
			t.Fatal("header round trip differs")
		}
	})
}
