package qcow

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/crashfs"
	"github.com/blktap-go/blktap/formats/internal/imagetest"
	"github.com/blktap-go/blktap/internal/oracle"
)

var update = flag.Bool("update", false, "regenerate testdata/*.qcow")

// badImages builds the crafted images of testdata from a small valid one.
// Each is named for its fault.
func badImages(t *testing.T) map[string][]byte {
	t.Helper()
	base := func(opts CreateOptions) []byte {
		m := newMem(t, opts)
		var backing image.Image
		if opts.Backing != "" {
			backing = &memImage{data: make([]byte, opts.Size)}
		}
		img := openMem(t, m, backing)
		img.WriteAt(bytes.Repeat([]byte{0xA5}, 8192), 4096)
		img.Close()
		return m.Bytes()
	}
	good := base(CreateOptions{Size: 1 << 20})
	// good: L1 at 48 (1 entry), L2 table at 4096, clusters at 8192, 12288.
	mod := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	out := map[string][]byte{
		"good-small.qcow":           good,
		"good-backed.qcow":          base(CreateOptions{Size: 1 << 20, Backing: "base.raw"}),
		"bad-magic.qcow":            mod(func(b []byte) []byte { b[0] = 'X'; return b }),
		"bad-version-2-qcow2.qcow":  mod(func(b []byte) []byte { b[7] = 2; return b }),
		"bad-version-9.qcow":        mod(func(b []byte) []byte { b[7] = 9; return b }),
		"bad-truncated-header.qcow": mod(func(b []byte) []byte { return b[:40] }),
		"bad-huge-l1-size.qcow": mod(func(b []byte) []byte {
			putBE64(b[24:], 1<<62)
			b[32], b[33] = 9, 6
			return b
		}),
		"bad-l1-offset-past-eof.qcow": mod(func(b []byte) []byte { putBE64(b[40:], 1<<40); return b }),
		"bad-l2-past-eof.qcow":        mod(func(b []byte) []byte { putBE64(b[48:], uint64(len(b))+4096); return b }),
		"bad-l2-overlaps-l1.qcow":     mod(func(b []byte) []byte { putBE64(b[48:], 48); return b }),
		"bad-cluster-bits-20.qcow":    mod(func(b []byte) []byte { b[32] = 20; return b }),
		"bad-l2-bits-3.qcow":          mod(func(b []byte) []byte { b[33] = 3; return b }),
		"bad-aes-encrypted.qcow":      mod(func(b []byte) []byte { putBE32(b[36:], 1); return b }),
		"bad-crypt-method-7.qcow":     mod(func(b []byte) []byte { putBE32(b[36:], 7); return b }),
		"bad-size-zero.qcow":          mod(func(b []byte) []byte { putBE64(b[24:], 0); return b }),
		"bad-backing-name-too-long.qcow": mod(func(b []byte) []byte {
			putBE64(b[8:], 48)
			putBE32(b[16:], 5000)
			return b
		}),
		"bad-backing-name-past-eof.qcow": mod(func(b []byte) []byte {
			putBE64(b[8:], uint64(len(b))-4)
			putBE32(b[16:], 100)
			return b
		}),
		// These open; the fault shows in Check, reads or writes.
		"bad-overlapping-clusters.qcow": mod(func(b []byte) []byte { putBE64(b[4096+16:], 8192); return b }),
		"bad-data-cluster-in-header.qcow": mod(func(b []byte) []byte {
			putBE64(b[4096+8:], 0x30) // virtual cluster 1 -> inside the L1
			return b
		}),
		// A write to virtual cluster 1 would overwrite the L2 table.
		"bad-data-cluster-is-l2.qcow":    mod(func(b []byte) []byte { putBE64(b[4096+8:], 4096); return b }),
		"bad-data-cluster-past-eof.qcow": mod(func(b []byte) []byte { putBE64(b[4096+8:], 1<<50); return b }),
		"bad-compressed-garbage.qcow": mod(func(b []byte) []byte {
			putBE64(b[4096+8:], flagCompressed|uint64(100)<<(63-12)|8192)
			return b
		}),
		"blktap-le-l1.qcow": func() []byte {
			img := buildBlktapImage(t, false)
			return img.st.(*crashfs.File).Bytes()
		}(),
	}
	withBacking := func(name string) []byte {
		h := &header{version: 1, size: 1 << 20, clusterBits: 9, l2Bits: 12,
			backingOffset: headerSize, backingSize: uint32(len(name)), backingName: name}
		h.l1Offset = (headerSize + uint64(len(name)) + 7) &^ 7
		h.l1Entries = 1
		return initialFile(h)
	}
	out["backing-etc-shadow.qcow"] = withBacking("/etc/shadow")
	out["backing-dotdot.qcow"] = withBacking("../../../etc/shadow")
	out["backing-loop.qcow"] = withBacking("backing-loop.qcow")
	return out
}

// TestTestdata regenerates testdata with -update (qemu-made seeds too) and
// otherwise checks that the stored crafted images still are what
// badImages builds.
func TestTestdata(t *testing.T) {
	imgs := badImages(t)
	for name, b := range imgs {
		got := imagetest.Stored(t, name, b, *update, "go test -run TestTestdata -update")
		if got != nil && !bytes.Equal(got, b) {
			t.Errorf("testdata/%s is stale (run go test -run TestTestdata -update)", name)
		}
	}
	if *update {
		qi := oracle.Require(t, "qemu-img")
		qio := oracle.Require(t, "qemu-io")
		dir := t.TempDir()
		raw := filepath.Join(dir, "src.raw")
		os.WriteFile(raw, bytes.Repeat([]byte("blktap qcow seed "), 4096), 0o644)
		// See TestQemuImagesReadIdentically for why the exit status is ignored.
		exec.Command(qi, "convert", "-c", "-f", "raw", "-O", "qcow", raw, filepath.Join("testdata", "qemu-compressed.qcow")).Run()
		p := filepath.Join("testdata", "qemu-written.qcow")
		os.Remove(p)
		run(t, qi, "create", "-f", "qcow", p, "1M")
		run(t, qio, "-f", "qcow", "-c", "write -P 0x42 4096 8192", p)
	}
}

// TestBadImages: each crafted image fails with its class and a message
// that names the fault; none panics.
func TestBadImages(t *testing.T) {
	openErr := map[string]error{
		"bad-magic.qcow":                 image.ErrWrongFormat,
		"bad-version-2-qcow2.qcow":       image.ErrWrongFormat,
		"bad-version-9.qcow":             image.ErrUnsupported,
		"bad-truncated-header.qcow":      image.ErrCorrupt,
		"bad-huge-l1-size.qcow":          image.ErrCorrupt,
		"bad-l1-offset-past-eof.qcow":    image.ErrCorrupt,
		"bad-l2-past-eof.qcow":           image.ErrCorrupt,
		"bad-l2-overlaps-l1.qcow":        image.ErrCorrupt,
		"bad-cluster-bits-20.qcow":       image.ErrCorrupt,
		"bad-l2-bits-3.qcow":             image.ErrCorrupt,
		"bad-aes-encrypted.qcow":         image.ErrUnsupported,
		"bad-crypt-method-7.qcow":        image.ErrCorrupt,
		"bad-size-zero.qcow":             image.ErrCorrupt,
		"bad-backing-name-too-long.qcow": image.ErrCorrupt,
		"bad-backing-name-past-eof.qcow": image.ErrCorrupt,
	}
	for name, class := range openErr {
		_, err := openStorage(newMemFile(imagetest.Testdata(t, name)), name, Options{})
		if imagetest.Classed(t, name, err, class) {
			t.Logf("%s: %v", name, err)
		}
	}
	if _, err := os.ReadFile("testdata/bad-aes-encrypted.qcow"); err == nil {
		_, err := Open("testdata/bad-aes-encrypted.qcow", Options{ReadOnly: true})
		if err == nil || !strings.Contains(err.Error(), "AES") {
			t.Errorf("AES image: %v", err)
		}
	}

	// Opens, but Check finds the fault, and reads/writes refuse it.
	for _, c := range []struct{ name, want string }{
		{"bad-overlapping-clusters.qcow", "used twice"},
		{"bad-data-cluster-in-header.qcow", "not inside the data area"},
		{"bad-data-cluster-past-eof.qcow", "not inside the data area"},
		{"bad-compressed-garbage.qcow", "does not inflate"},
	} {
		res, err := Check(filepath.Join("testdata", c.name), CheckOptions{})
		if err != nil || res.OK() || !strings.Contains(fmt.Sprint(res.Corruptions), c.want) {
			t.Errorf("%s: check %v %+v, want a corruption containing %q", c.name, err, res, c.want)
		}
	}
	b, _ := os.ReadFile("testdata/bad-data-cluster-in-header.qcow")
	img := openMem(t, newMemFile(b), nil)
	if _, err := img.WriteAt([]byte{1}, 4096); !errors.Is(err, image.ErrCorrupt) {
		t.Errorf("write through an entry pointing into the L1: %v", err)
	}
	b, _ = os.ReadFile("testdata/bad-data-cluster-past-eof.qcow")
	img = openMem(t, newMemFile(b), nil)
	if _, err := img.WriteAt([]byte{1}, 4096); !errors.Is(err, image.ErrCorrupt) {
		t.Errorf("write through an entry past EOF: %v", err)
	}
	b, _ = os.ReadFile("testdata/bad-compressed-garbage.qcow")
	img = openMem(t, newMemFile(b), nil)
	if _, err := img.ReadAt(make([]byte, 10), 4096); !errors.Is(err, image.ErrCorrupt) {
		t.Errorf("read of a garbage compressed cluster: %v", err)
	}

	// Backing names are the opener's to judge: a confining opener refuses
	// /etc/shadow and ../ escapes, and bounds a loop by depth.
	dir, _ := filepath.Abs("testdata")
	for _, name := range []string{"backing-etc-shadow.qcow", "backing-dotdot.qcow", "backing-loop.qcow"} {
		_, err := Open(filepath.Join(dir, name), Options{ReadOnly: true, Backing: confinedOpener(dir, 0)})
		if err == nil || !errors.Is(err, errNotAllowed) {
			t.Errorf("%s: %v", name, err)
		}
		t.Logf("%s: %v", name, err)
	}
}

var errNotAllowed = errors.New("backing file not allowed")

// confinedOpener is what a caller's opener must do (DESIGN, STYLE traps):
// resolve against dir, stay inside it, bound the depth.
func confinedOpener(dir string, depth int) image.OpenFunc {
	return func(name, format string) (image.Image, error) {
		if depth >= 8 {
			return nil, fmt.Errorf("%w: chain deeper than 8 (a loop?)", errNotAllowed)
		}
		p := name
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		if rel, err := filepath.Rel(dir, filepath.Clean(p)); err != nil || strings.HasPrefix(rel, "..") {
			return nil, fmt.Errorf("%w: %q is outside %s", errNotAllowed, name, dir)
		}
		return Open(p, Options{ReadOnly: true, Backing: confinedOpener(filepath.Dir(p), depth+1)})
	}
}

// FuzzOpen feeds arbitrary bytes to the parser, then exercises the image
// it accepts: Map, reads, a write, Check. Nothing may panic or hang, and
// rejections carry an error class.
func FuzzOpen(f *testing.F) {
	ents, _ := os.ReadDir("testdata")
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".qcow") {
			b, err := os.ReadFile(filepath.Join("testdata", e.Name()))
			if err == nil {
				f.Add(b)
			}
		}
	}
	f.Fuzz(runFuzzBody)
}

func runFuzzBody(t *testing.T, data []byte) {
	{
		if len(data) > 1<<20 {
			return
		}
		m := newMemFile(data)
		opener := func(string, string) (image.Image, error) { return &memImage{data: make([]byte, 4096)}, nil }
		img, err := openStorage(m, "fuzz", Options{Backing: opener, L2CacheTables: 4})
		if err != nil {
			if !errors.Is(err, image.ErrCorrupt) && !errors.Is(err, image.ErrUnsupported) &&
				!errors.Is(err, image.ErrWrongFormat) {
				t.Fatalf("unclassified error: %v", err)
			}
			return
		}
		ext, err := img.Map(0, img.Size())
		if err == nil {
			imagetest.Tiles(t, ext, img.Size())
		}
		buf := make([]byte, min(img.Size(), 65536))
		img.ReadAt(buf, 0)
		for i, e := range ext {
			if i >= 4 {
				break
			}
			img.ReadAt(buf[:min(int64(len(buf)), e.Length)], e.Offset)
		}
		p := []byte("fuzz")
		if _, err := img.WriteAt(p, 0); err == nil {
			got := make([]byte, len(p))
			if _, err := img.ReadAt(got, 0); err == nil && !bytes.Equal(got, p) {
				t.Fatalf("read %q after writing %q", got, p)
			}
		}
		img.Discard(0, min(img.Size(), 1<<16))
		check(newMemFile(data), CheckOptions{})
	}
}
