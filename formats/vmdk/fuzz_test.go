package vmdk

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/crashfs"
	"github.com/blktap-go/blktap/formats/internal/imagetest"
	"github.com/blktap-go/blktap/internal/corpus"
)

var rewrite = flag.Bool("rewrite", false, "regenerate testdata/*.vmdk")

// baseSparse is a 4 MiB monolithicSparse image (4 KiB grains, two grain
// tables) with grain 0 written: header @0, descriptor @1, RGD @21, its
// tables @22, GD @30, its tables @31 and @35, grains from sector 40.
func baseSparse(t testing.TB) []byte {
	fs := crashfs.New()
	const p = "/t/base.vmdk"
	if err := Create(p, CreateOptions{Size: 4 << 20, ClusterSize: 4096, fs: fs}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, Options{fs: fs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(bytes.Repeat([]byte("grain zero "), 300), 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	return fs.ReadFile(p)
}

// baseStream is a 1 MiB streamOptimized image with grain 0 written: grain
// marker at 64 KiB, then tables, directory, footer, end-of-stream.
func baseStream(t testing.TB) []byte {
	fs := crashfs.New()
	fs.SetFile("/t/src.vmdk", baseSparse(t))
	in, err := Open("/t/src.vmdk", Options{ReadOnly: true, fs: fs})
	if err != nil {
		t.Fatal(err)
	}
	if err := writeStream(context.Background(), fs, "/t/so.vmdk", in); err != nil {
		t.Fatal(err)
	}
	return fs.ReadFile("/t/so.vmdk")
}

func mut(b []byte, f func(b []byte)) []byte {
	b = bytes.Clone(b)
	f(b)
	return b
}

func put32(off int, v uint32) func([]byte) {
	return func(b []byte) { binary.LittleEndian.PutUint32(b[off:], v) }
}

func put64(off int, v uint64) func([]byte) {
	return func(b []byte) { binary.LittleEndian.PutUint64(b[off:], v) }
}

func withDesc(text string) func([]byte) {
	return func(b []byte) {
		clear(b[512 : 21*512])
		copy(b[512:], text)
	}
}

const goodDesc = `# Disk DescriptorFile
version=1
CID=12345678
parentCID=ffffffff
createType="monolithicSparse"

# Extent description
RW 8192 SPARSE "x.vmdk"
`

const flatDesc = `# Disk DescriptorFile
version=1
CID=12345678
parentCID=ffffffff
createType="monolithicFlat"

# Extent description
RW 8 FLAT "good-flat-flat.vmdk" 0
RW 8 ZERO
`

// testdataCase is one fixture and the outcome it must give.
type testdataCase struct {
	name         string
	gen          func(t testing.TB) []byte
	openErr      error // class Open must fail with
	readErr      error // class a full read must fail with
	checkCorrupt bool  // Check must count a corruption
}

func descCase(name, text string, openErr error) testdataCase {
	return testdataCase{name: name, gen: func(testing.TB) []byte { return []byte(text) }, openErr: openErr}
}

var testdataCases = []testdataCase{
	{name: "good-monolithicSparse", gen: baseSparse},
	{name: "good-streamOptimized", gen: baseStream},
	{name: "good-flat-flat", gen: func(testing.TB) []byte { return bytes.Repeat([]byte{0x5a}, 4096) }, openErr: image.ErrWrongFormat},
	{name: "good-flat", gen: func(testing.TB) []byte { return []byte(flatDesc) }},
	{name: "bad-gd-past-eof", gen: func(t testing.TB) []byte { return mut(baseSparse(t), put64(56, 1<<30)) }, openErr: image.ErrCorrupt},
	{name: "bad-gt-past-eof", gen: func(t testing.TB) []byte { return mut(baseSparse(t), put32(30*512, 1<<30)) }, readErr: image.ErrCorrupt, checkCorrupt: true},
	{name: "bad-grain-past-eof", gen: func(t testing.TB) []byte { return mut(baseSparse(t), put32(31*512, 100000)) }, readErr: image.ErrCorrupt, checkCorrupt: true},
	{name: "bad-grain-in-metadata", gen: func(t testing.TB) []byte { return mut(baseSparse(t), put32(31*512, 2)) }, readErr: image.ErrCorrupt, checkCorrupt: true},
	{name: "bad-overlapping-grains", gen: func(t testing.TB) []byte { return mut(baseSparse(t), put32(31*512+4, 40)) }, checkCorrupt: true},
	// Grain table 1 stored over table 0: a write-back of either
	// rewrites the other.
	{name: "bad-gt-over-gt", gen: func(t testing.TB) []byte { return mut(baseSparse(t), put32(30*512+4, 31)) }, checkCorrupt: true},
	// Grain table 1 moved past the grains, its entry for grain 512
	// naming the table itself: writing that grain rewrites the table.
	{name: "bad-grain-on-gt", gen: func(t testing.TB) []byte {
		b := baseSparse(t)
		end := uint32(len(b) / 512)
		gt := bytes.Clone(b[35*512 : 39*512])
		binary.LittleEndian.PutUint32(gt, end)
		b = append(append(b, gt...), gt...)
		put32(30*512+4, end)(b)
		put32(21*512+4, end+4)(b)
		return b
	}, checkCorrupt: true},
	{name: "bad-grain-size-zero", gen: func(t testing.TB) []byte { return mut(baseSparse(t), put64(20, 0)) }, openErr: image.ErrCorrupt},
	{name: "bad-huge-gtes-per-gt", gen: func(t testing.TB) []byte { return mut(baseSparse(t), put32(44, 1<<20)) }, openErr: image.ErrUnsupported},
	{name: "bad-huge-capacity", gen: func(t testing.TB) []byte { return mut(baseSparse(t), put64(12, 1<<50)) }, openErr: image.ErrUnsupported},
	{name: "bad-capacity-overflow", gen: func(t testing.TB) []byte { return mut(baseSparse(t), put64(12, 1<<62)) }, openErr: image.ErrCorrupt},
	{name: "bad-huge-desc-size", gen: func(t testing.TB) []byte { return mut(baseSparse(t), put64(36, 1<<40)) }, openErr: image.ErrCorrupt},
	{name: "bad-check-bytes", gen: func(t testing.TB) []byte { return mut(baseSparse(t), func(b []byte) { b[75] = '\n' }) }, openErr: image.ErrCorrupt},
	{name: "bad-cowd-magic", gen: func(t testing.TB) []byte { return mut(baseSparse(t), func(b []byte) { copy(b, "COWD") }) }, openErr: image.ErrUnsupported},
	{name: "bad-embedded-two-extents", gen: func(t testing.TB) []byte {
		return mut(baseSparse(t), withDesc(goodDesc+"RW 8192 SPARSE \"y.vmdk\"\n"))
	}, openErr: image.ErrCorrupt},
	{name: "bad-parent-etc-shadow", gen: func(t testing.TB) []byte {
		return mut(baseSparse(t), withDesc(strings.Replace(goodDesc, "createType", "parentFileNameHint=\"/etc/shadow\"\ncreateType", 1)))
	}, openErr: image.ErrUnsupported},
	{name: "bad-stream-marker-lba", gen: func(t testing.TB) []byte { return mut(baseStream(t), put64(65536, 12345)) }, readErr: image.ErrCorrupt, checkCorrupt: true},
	{name: "bad-stream-zlib", gen: func(t testing.TB) []byte {
		return mut(baseStream(t), func(b []byte) { copy(b[65536+14:], "garbage!garbage!") })
	}, readErr: image.ErrCorrupt, checkCorrupt: true},
	{name: "bad-stream-huge-marker-size", gen: func(t testing.TB) []byte { return mut(baseStream(t), put32(65536+8, 0xffffffff)) }, readErr: image.ErrCorrupt, checkCorrupt: true},
	{name: "bad-stream-no-footer", gen: func(t testing.TB) []byte { b := baseStream(t); return b[:len(b)-1024] }, openErr: image.ErrCorrupt},
	descCase("bad-desc-absolute-extent", strings.Replace(flatDesc, "good-flat-flat.vmdk", "/etc/shadow", 1), image.ErrUnsupported),
	descCase("bad-desc-dotdot-extent", strings.Replace(flatDesc, "good-flat-flat.vmdk", "../../etc/shadow", 1), image.ErrUnsupported),
	descCase("bad-desc-no-createtype", strings.Replace(flatDesc, "createType=\"monolithicFlat\"\n", "", 1), image.ErrCorrupt),
	descCase("bad-desc-cid-not-hex", strings.Replace(flatDesc, "CID=12345678", "CID=1234567z", 1), image.ErrCorrupt),
	descCase("bad-desc-unterminated-quote", strings.Replace(flatDesc, "\"good-flat-flat.vmdk\"", "\"good-flat-flat.vmdk", 1), image.ErrCorrupt),
	descCase("bad-desc-duplicate-key", strings.Replace(flatDesc, "version=1", "version=1\nversion=1", 1), image.ErrCorrupt),
	descCase("bad-desc-vmfssparse", strings.Replace(flatDesc, "monolithicFlat", "vmfsSparse", 1), image.ErrUnsupported),
	descCase("bad-desc-negative-size", strings.Replace(flatDesc, "RW 8 FLAT", "RW -8 FLAT", 1), image.ErrCorrupt),
	descCase("bad-desc-garbage-line", flatDesc+"this is not a descriptor line\n", image.ErrCorrupt),
}

// TestTestdata: each fixture, named for its fault, fails with the class it
// names and never panics. go test -run TestTestdata -rewrite regenerates.
func TestTestdata(t *testing.T) {
	for _, tc := range testdataCases {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join("testdata", tc.name+".vmdk")
			if *rewrite {
				if err := os.WriteFile(p, tc.gen(t), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			img, err := Open(p, Options{ReadOnly: true})
			if tc.openErr != nil {
				imagetest.Classed(t, "Open", err, tc.openErr)
				return
			}
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			defer img.Close()
			_, rerr := img.ReadAt(make([]byte, img.Size()), 0)
			if tc.readErr != nil && !errors.Is(rerr, tc.readErr) || tc.readErr == nil && rerr != nil {
				t.Fatalf("read: %v, want %v", rerr, tc.readErr)
			}
			res, err := Check(p, CheckOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if (res.Corruptions > 0) != tc.checkCorrupt {
				t.Fatalf("check: %+v", res)
			}
		})
	}
}

// FuzzOpen: any bytes, as a sparse extent or a descriptor, give an image
// or a clear error; an image reads, maps and checks without panic.
func FuzzOpen(f *testing.F) {
	for _, b := range corpus.Files(f, "*.vmdk") {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		fs := crashfs.FromImage(map[string][]byte{"/t/x.vmdk": data, "/t/good-flat-flat.vmdk": make([]byte, 4096)})
		img, err := Open("/t/x.vmdk", Options{ReadOnly: true, fs: fs})
		if err != nil {
			if !errors.Is(err, image.ErrCorrupt) && !errors.Is(err, image.ErrUnsupported) && !errors.Is(err, image.ErrWrongFormat) && !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("unclassified error: %v", err)
			}
			return
		}
		defer img.Close()
		n := min(img.Size(), 8<<20)
		buf := make([]byte, 256<<10)
		for off := int64(0); off < n; off += int64(len(buf)) {
			k := min(int64(len(buf)), n-off)
			img.ReadAt(buf[:k], off)
		}
		if img.Size() > n {
			img.ReadAt(buf[:1], img.Size()-1)
		}
		img.Map(0, n)
		img.Info()
		if _, err := Check("/t/x.vmdk", CheckOptions{fs: fs}); err != nil {
			t.Fatalf("Check fails where Open succeeded: %v", err)
		}
		// Writing a hostile image may fail but must not panic or hang.
		if w, err := Open("/t/x.vmdk", Options{fs: fs}); err == nil {
			w.WriteAt(buf[:min(int64(len(buf)), 70000, w.Size())], 0)
			if w.Size() > 1 {
				w.Discard(w.Size()/2, 1)
			}
			w.Close()
		}
	})
}

// FuzzDescriptor: an accepted descriptor round-trips through marshal.
func FuzzDescriptor(f *testing.F) {
	f.Add([]byte(goodDesc))
	f.Add([]byte(flatDesc))
	for _, b := range corpus.Files(f, "*.vmdk") {
		if len(b) > 21*512 && string(b[:4]) == magicSparse {
			b = b[512 : 21*512]
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, text []byte) {
		d, err := ParseDescriptor(text)
		if err != nil {
			if !errors.Is(err, image.ErrCorrupt) && !errors.Is(err, image.ErrUnsupported) {
				t.Fatalf("unclassified error: %v", err)
			}
			return
		}
		d2, err := ParseDescriptor(d.marshal())
		if err != nil {
			t.Fatalf("marshalled descriptor does not parse: %v\n%s", err, d.marshal())
		}
		for i := range d2.Extents {
			d2.Extents[i].Line = d.Extents[i].Line
		}
		if d2.CID != d.CID || d2.ParentCID != d.ParentCID || d2.CreateType != d.CreateType ||
			d2.ParentFileNameHint != d.ParentFileNameHint || !reflect.DeepEqual(d2.Extents, d.Extents) {
			t.Fatalf("round trip: %+v != %+v", d2, d)
		}
	})
}

// FuzzSparseHeader: an accepted header round-trips through marshal.
func FuzzSparseHeader(f *testing.F) {
	for _, b := range corpus.Files(f, "*.vmdk") {
		if len(b) >= 512 {
			f.Add(b[:512])
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := parseSparseHeader(b, 0)
		if err != nil {
			return
		}
		h2, err := parseSparseHeader(h.marshal(), 0)
		if err != nil || *h2 != *h {
			t.Fatalf("round trip: %v %+v != %+v", err, h2, h)
		}
	})
}
