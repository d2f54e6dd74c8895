package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
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

// rawImage is a read-only raw file as an image.Image (the formats/raw
// package is someone else's; this keeps the test self-contained).
type rawImage struct {
	f    *os.File
	size int64
}

func openRaw(path string) (*rawImage, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &rawImage{f: f, size: st.Size()}, nil
}

func (r *rawImage) ReadAt(p []byte, off int64) (int, error) {
	if err := image.CheckRange(off, len(p), r.size); err != nil {
		return 0, err
	}
	return r.f.ReadAt(p, off)
}
func (r *rawImage) WriteAt([]byte, int64) (int, error) { return 0, image.ErrReadOnly }
func (r *rawImage) Size() int64                        { return r.size }
func (r *rawImage) Flush() error                       { return nil }
func (r *rawImage) Discard(int64, int64) error         { return image.ErrReadOnly }
func (r *rawImage) Close() error                       { return r.f.Close() }
func (r *rawImage) Map(off, n int64) ([]image.Extent, error) {
	return []image.Extent{{Offset: off, Length: n, Kind: image.Data}}, nil
}

var errConfined = errors.New("backing file outside the image directory")

// confinedOpener opens backing files the way the daemon must: names
// resolve against dir, nothing outside dir, at most depth levels, no
// loops, a backing file without a declared format is probed (qcow2 or
// raw) and opened read-only.
func confinedOpener(dir string, depth int, seen map[string]bool) image.OpenFunc {
	return func(name, format string) (image.Image, error) {
		p := name
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		p = filepath.Clean(p)
		if rel, err := filepath.Rel(dir, p); err != nil || strings.HasPrefix(rel, "..") {
			return nil, fmt.Errorf("%w: %s", errConfined, name)
		}
		if depth <= 0 {
			return nil, fmt.Errorf("backing chain too deep at %s", name)
		}
		if seen[p] {
			return nil, fmt.Errorf("backing loop at %s", name)
		}
		next := map[string]bool{p: true}
		for k := range seen {
			next[k] = true
		}
		if format == "" {
			hdr := make([]byte, 512)
			f, err := os.Open(p)
			if err != nil {
				return nil, err
			}
			n, _ := f.ReadAt(hdr, 0)
			f.Close()
			format = "raw"
			if Detect(hdr[:n]) {
				format = "qcow2"
			}
		}
		switch format {
		case "raw":
			return openRaw(p)
		case "qcow2":
			return Open(p, Options{ReadOnly: true, Backing: confinedOpener(dir, depth-1, next)})
		}
		return nil, fmt.Errorf("backing format %q not supported here", format)
	}
}

func openerFor(path string) image.OpenFunc {
	return confinedOpener(filepath.Dir(path), 8, map[string]bool{filepath.Clean(path): true})
}

// run runs an oracle program and fails the test on error.
func run(t testing.TB, prog string, args ...string) string {
	t.Helper()
	return oracle.Run(t, prog, args...)
}

// qemuCheck runs qemu-img check and returns its exit code and output.
func qemuCheck(t testing.TB, path string) (int, string) {
	t.Helper()
	p := oracle.Require(t, "qemu-img")
	out, err := exec.Command(p, "check", "-f", "qcow2", path).CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), string(out)
	}
	if err != nil {
		t.Fatalf("qemu-img check: %v", err)
	}
	return 0, string(out)
}

func requireQemuClean(t testing.TB, path string) {
	t.Helper()
	if code, out := qemuCheck(t, path); code != 0 || !strings.Contains(out, "No errors were found") {
		t.Fatalf("qemu-img check %s: exit %d\n%s", path, code, out)
	}
}

// qemuRaw converts an image to raw with qemu-img and returns the bytes.
func qemuRaw(t testing.TB, path string, extra ...string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.raw")
	args := append([]string{"convert"}, extra...)
	args = append(args, "-O", "raw", path, out)
	run(t, "qemu-img", args...)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// readAll reads a whole image through our code in odd-sized chunks.
func readAll(t testing.TB, img image.Image) []byte {
	t.Helper()
	out := make([]byte, img.Size())
	const step = 100_000 // deliberately not a cluster multiple
	for off := int64(0); off < img.Size(); off += step {
		end := min(off+step, img.Size())
		if _, err := img.ReadAt(out[off:end], off); err != nil {
			t.Fatalf("ReadAt %d: %v", off, err)
		}
	}
	return out
}

func sameBytes(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: length %d, want %d", what, len(got), len(want))
	}
	if i := imagetest.FirstDiff(got, want); i >= 0 {
		t.Fatalf("%s: first difference at byte %d (got %#x want %#x)", what, i, got[i], want[i])
	}
}

func fill(rng *rand.Rand, n int) []byte {
	b := make([]byte, n+8)
	for i := 0; i < n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], rng.Uint64())
	}
	return b[:n]
}

// newMemFile is a durable in-memory host file holding b.
func newMemFile(b []byte) *crashfs.File { return crashfs.NewFile(b) }

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// openOnCrashFS opens data, the bytes of the image tmpl, on a crashfs
// file, with tmpl's backing file.
func openOnCrashFS(t *testing.T, tmpl string, data []byte) (*crashfs.File, *Image) {
	t.Helper()
	mf := newMemFile(data)
	img, err := openStorage(mf, tmpl, Options{Backing: openerFor(tmpl)})
	if err != nil {
		t.Fatal(err)
	}
	return mf, img
}
