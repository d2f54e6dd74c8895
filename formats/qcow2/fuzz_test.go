package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/internal/corpus"
)

var updateTestdata = flag.Bool("update-testdata", false, "rewrite the crafted images in testdata/")

// badImage is a crafted image named for its fault, and what must happen.
type badImage struct {
	name  string
	make  func(good []byte) []byte
	phase string // "open", "read" or "check": where the fault shows
	class error  // the error class (for "check": nil, corruptions counted)
}

func be64(b []byte, off int, v uint64) { binary.BigEndian.PutUint64(b[off:], v) }
func be32(b []byte, off int, v uint32) { binary.BigEndian.PutUint32(b[off:], v) }
func be16(b []byte, off int, v uint16) { binary.BigEndian.PutUint16(b[off:], v) }

// goodImage is a small valid image: 4 KiB clusters, 256 KiB, two data
// clusters written (guest clusters 0 and 1), one compressed-free layout.
func goodImage(t testing.TB) []byte {
	t.Helper()
	p := filepath.Join(t.TempDir(), "good.qcow2")
	img, err := CreateImage(p, CreateOptions{Size: 256 << 10, ClusterSize: 4096}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(bytes.Repeat([]byte{0xAB}, 8192), 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Layout of goodImage (from Create): header 0, reftable 4096, refblock
// 8192, L1 12288, then L2 and data clusters.
func l2Of(b []byte) int { return int(binary.BigEndian.Uint64(b[12288:]) & offsetMask) }

func withBacking(b []byte, name string) []byte {
	b = bytes.Clone(b)
	off := 1024
	be64(b, 8, uint64(off))
	be32(b, 16, uint32(len(name)))
	copy(b[off:], name)
	return b
}

var badImages = []badImage{
	{"huge-l1-size", func(b []byte) []byte { be32(b, 36, 0xffffffff); return b }, "open", image.ErrCorrupt},
	{"l1-past-eof", func(b []byte) []byte { be64(b, 40, 1<<40); return b }, "open", image.ErrCorrupt},
	{"l1-size-too-small", func(b []byte) []byte { be32(b, 36, 0); be64(b, 24, 1<<40); return b }, "open", image.ErrCorrupt},
	{"l2-past-eof", func(b []byte) []byte { be64(b, 12288, 1<<30|uint64(entryCopied)); return b }, "read", image.ErrCorrupt},
	{"l2-unaligned", func(b []byte) []byte { be64(b, 12288, 4096*5+512|entryCopied); return b }, "read", image.ErrCorrupt},
	{"data-overlaps-metadata", func(b []byte) []byte { return overlapHeader(b) }, "read", image.ErrCorrupt},
	{"overlapping-clusters", func(b []byte) []byte { l2 := l2Of(b); copy(b[l2+8:l2+16], b[l2:l2+8]); return b }, "check", nil},
	{"l2-entry-reserved-bits", func(b []byte) []byte { l2 := l2Of(b); b[l2+7] |= 2; return b }, "read", image.ErrCorrupt},
	{"compressed-garbage", func(b []byte) []byte {
		l2 := l2Of(b)
		// A compressed descriptor naming the L1 table's bytes: not deflate.
		be64(b, l2, entryCompressed|12288)
		return b
	}, "read", image.ErrCorrupt},
	{"reftable-past-eof", func(b []byte) []byte { be64(b, 48, 1<<40); return b }, "open", image.ErrCorrupt},
	{"reftable-huge", func(b []byte) []byte { be32(b, 56, 0xffffffff); return b }, "open", image.ErrCorrupt},
	// Issue 16's damaged images: a refcount table naming itself as a
	// refcount block, and an L2 table whose refcount is 0.
	{"reftable-points-at-itself", func(b []byte) []byte { be64(b, 4096, 4096); return b }, "check", nil},
	{"l2-refcount-zero", func(b []byte) []byte { be16(b, 8192+2*(l2Of(b)/4096), 0); return b }, "check", nil},
	{"refblock-past-eof", func(b []byte) []byte { be64(b, 4096, 1<<40); return b }, "check", nil},
	{"snapshots-past-eof", func(b []byte) []byte { be32(b, 60, 3); be64(b, 64, 1<<40); return b }, "open", image.ErrCorrupt},
	{"snapshots-too-many", func(b []byte) []byte { be32(b, 60, 1<<20); be64(b, 64, 4096); return b }, "open", image.ErrCorrupt},
	{"cluster-bits-30", func(b []byte) []byte { be32(b, 20, 30); return b }, "open", image.ErrUnsupported},
	{"cluster-bits-8", func(b []byte) []byte { be32(b, 20, 8); return b }, "open", image.ErrUnsupported},
	{"refcount-order-7", func(b []byte) []byte { be32(b, 96, 7); return b }, "open", image.ErrCorrupt},
	{"header-length-odd", func(b []byte) []byte { be32(b, 100, 105); return b }, "open", image.ErrCorrupt},
	{"header-truncated", func(b []byte) []byte { return b[:50] }, "open", image.ErrCorrupt},
	{"version-1-is-qcow", func(b []byte) []byte { be32(b, 4, 1); return b }, "open", image.ErrWrongFormat},
	{"version-4", func(b []byte) []byte { be32(b, 4, 4); return b }, "open", image.ErrUnsupported},
	{"bad-magic", func(b []byte) []byte { copy(b, "VHDX"); return b }, "open", image.ErrWrongFormat},
	{"encrypted-aes", func(b []byte) []byte { be32(b, 32, 1); return b }, "open", image.ErrUnsupported},
	{"encrypted-luks", func(b []byte) []byte { be32(b, 32, 2); return b }, "open", image.ErrUnsupported},
	{"external-data-file", func(b []byte) []byte { be64(b, 72, incExternalData); return b }, "open", image.ErrUnsupported},
	{"extended-l2", func(b []byte) []byte { be64(b, 72, incExtendedL2); return b }, "open", image.ErrUnsupported},
	{"incompatible-bit-40", func(b []byte) []byte { be64(b, 72, 1<<40); return b }, "open", image.ErrUnsupported},
	{"compression-type-2", func(b []byte) []byte { be64(b, 72, incCompression); b[104] = 2; return b }, "open", image.ErrUnsupported},
	{"extension-overruns-cluster", func(b []byte) []byte { be32(b, 112, 0x12345678); be32(b, 116, 5000); return b }, "open", image.ErrCorrupt},
	{"backing-name-too-long", func(b []byte) []byte { b = withBacking(b, "x"); be32(b, 16, 3000); return b }, "open", image.ErrCorrupt},
	{"backing-etc-shadow", func(b []byte) []byte { return withBacking(b, "/etc/shadow") }, "open", errConfined},
	{"backing-parent-escape", func(b []byte) []byte { return withBacking(b, "../../etc/shadow") }, "open", errConfined},
	{"backing-loop", func(b []byte) []byte { return withBacking(b, "backing-loop.qcow2") }, "open", nil},
}

// overlapHeader points guest cluster 0 at the L1 table's cluster: a
// write there would destroy metadata.
func overlapHeader(b []byte) []byte {
	be64(b, l2Of(b), 12288|entryCopied)
	return b
}

func TestBadImages(t *testing.T) {
	good := goodImage(t)
	dir := filepath.Join("testdata")
	for _, bi := range badImages {
		t.Run(bi.name, func(t *testing.T) {
			p := filepath.Join(dir, bi.name+".qcow2")
			if *updateTestdata {
				if err := os.WriteFile(p, bi.make(bytes.Clone(good)), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			data, err := os.ReadFile(p)
			if err != nil {
				t.Fatalf("%v (run with -update-testdata)", err)
			}
			// Work on a copy: backing names resolve inside its directory.
			tmp := filepath.Join(t.TempDir(), bi.name+".qcow2")
			if err := os.WriteFile(tmp, data, 0o644); err != nil {
				t.Fatal(err)
			}
			img, err := Open(tmp, Options{ReadOnly: true, Backing: openerFor(tmp)})
			if bi.phase == "open" {
				if err == nil {
					img.Close()
					t.Fatal("opened")
				}
				if bi.class != nil && !errors.Is(err, bi.class) {
					t.Fatalf("got %v, want class %v", err, bi.class)
				}
				if bi.name == "backing-loop" && !strings.Contains(err.Error(), "loop") {
					t.Fatalf("got %v, want a loop refusal", err)
				}
				t.Logf("%v", err)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			buf := make([]byte, img.Size())
			_, rerr := img.ReadAt(buf, 0)
			if bi.phase == "read" {
				var fe *image.FormatError
				if !errors.Is(rerr, bi.class) || !errors.As(rerr, &fe) {
					t.Fatalf("read: got %v, want a FormatError of class %v", rerr, bi.class)
				}
				t.Logf("%v", rerr)
				// Writing to the bad cluster fails too, never panics.
				w, werr := Open(tmp, Options{})
				if werr == nil {
					_, werr = w.WriteAt([]byte{1}, 0)
					w.Close()
				}
				t.Logf("write: %v", werr)
				return
			}
			res, err := Check(tmp, CheckOptions{})
			if err != nil || res.Corruptions == 0 {
				t.Fatalf("check: %v %+v", err, res)
			}
			t.Logf("%v", res.Problems)
			if code, _ := qemuCheck(t, tmp); code != 2 {
				t.Fatalf("qemu-img check exit %d, want 2 (corruptions)", code)
			}
		})
	}
}

func seedCorpus(f *testing.F) {
	for _, b := range corpus.Files(f, "*.qcow2") {
		f.Add(b)
	}
}

// FuzzOpen: any bytes, opened, read, mapped, checked and (small clusters)
// written, give errors of our classes and never panic or hang.
func FuzzOpen(f *testing.F) {
	seedCorpus(f)
	f.Fuzz(fuzzOpenBody)
}

func fuzzOpenBody(t *testing.T, data []byte) {
	refuse := func(name, format string) (image.Image, error) { return nil, errConfined }
	{
		img, err := openStorage(newMemFile(data), "fuzz", Options{ReadOnly: true, Backing: refuse})
		if err != nil {
			if !errors.Is(err, image.ErrCorrupt) && !errors.Is(err, image.ErrUnsupported) &&
				!errors.Is(err, image.ErrWrongFormat) && !errors.Is(err, errConfined) {
				t.Fatalf("unclassified error: %v", err)
			}
			return
		}
		n := min(img.Size(), 1<<20)
		buf := make([]byte, 64<<10)
		for off := int64(0); off < n; off += int64(len(buf)) {
			m := min(int64(len(buf)), n-off)
			if _, err := img.ReadAt(buf[:m], off); err != nil {
				break
			}
		}
		img.Map(0, min(img.Size(), 64<<20))
		img.Info()
		img.check(RepairNone)
		img.Close()
		if img.cs > 64<<10 {
			return
		}
		w, err := openStorage(newMemFile(data), "fuzz", Options{Backing: refuse})
		if err != nil {
			return
		}
		if w.Size() > 0 {
			w.WriteAt([]byte{1, 2, 3}, w.Size()/2)
			w.Discard(0, min(w.Size(), 1<<20))
			w.WriteAt(make([]byte, 5000), 0)
		}
		// Snapshot operations on whatever tables the bytes hold: errors,
		// never a panic or a hang.
		w.CreateSnapshot("fuzz", time.Unix(0, 0))
		w.ApplySnapshot("1")
		w.DeleteSnapshot("fuzz")
		w.Close()
	}
}

// FuzzHeader: an accepted header re-encodes to one that decodes the same.
func FuzzHeader(f *testing.F) {
	seedCorpus(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := readHeader(bytes.NewReader(data), maxFileSize)
		if err != nil {
			return
		}
		if h.version == 2 && h.refcountOrder != 4 {
			t.Fatalf("v2 refcount order %d", h.refcountOrder)
		}
		enc, err := encodeHeader(h)
		if err != nil {
			return // e.g. names that do not fit with our extensions
		}
		h2, err := readHeader(bytes.NewReader(enc), maxFileSize)
		if err != nil {
			t.Fatalf("re-read: %v", err)
		}
		if h2.version != h.version || h2.size != h.size || h2.clusterBits != h.clusterBits ||
			h2.backingName != h.backingName || h2.backingFormat != h.backingFormat ||
			h2.l1Size != h.l1Size || h2.l1Offset != h.l1Offset || h2.refcountOrder != h.refcountOrder ||
			h2.refTableOffset != h.refTableOffset || h2.incompatible != h.incompatible {
			t.Fatalf("round trip:\n%+v\n%+v", h, h2)
		}
	})
}
