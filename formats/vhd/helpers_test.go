package vhd

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/internal/oracle"
)

func runCmd(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

// qemuRaw converts a VHD to raw with qemu-img and returns the bytes.
func qemuRaw(t testing.TB, path string) []byte {
	t.Helper()
	qi := oracle.Require(t, "qemu-img")
	out := filepath.Join(t.TempDir(), "out.raw")
	runCmd(t, qi, "convert", "-f", "vpc", "-O", "raw", path, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

type qemuInfo struct {
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtual-size"`
}

func qemuImgInfo(t testing.TB, path string) qemuInfo {
	t.Helper()
	qi := oracle.Require(t, "qemu-img")
	var in qemuInfo
	if err := json.Unmarshal([]byte(runCmd(t, qi, "info", "-f", "vpc", "--output=json", path)), &in); err != nil {
		t.Fatal(err)
	}
	return in
}

// readAll reads the whole image in odd-sized chunks (to cross block and
// sector edges).
func readAll(t testing.TB, img image.Image) []byte {
	t.Helper()
	out := make([]byte, img.Size())
	for off := int64(0); off < img.Size(); {
		n := min(int64(777*1024+13), img.Size()-off)
		if _, err := img.ReadAt(out[off:off+n], off); err != nil {
			t.Fatalf("ReadAt %d+%d: %v", off, n, err)
		}
		off += n
	}
	return out
}

func firstDiff(a, b []byte) string {
	if len(a) != len(b) {
		return fmt.Sprintf("lengths %d vs %d", len(a), len(b))
	}
	for i := range a {
		if a[i] != b[i] {
			return fmt.Sprintf("first difference at byte %d: %#x vs %#x", i, a[i], b[i])
		}
	}
	return ""
}

func mustEqual(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: %s", what, firstDiff(got, want))
	}
}

// fileOpener opens parents as VHDs relative to dir, read-only.
func fileOpener(dir string) image.OpenFunc {
	var open image.OpenFunc
	open = func(name, format string) (image.Image, error) {
		if format != "vhd" {
			return nil, fmt.Errorf("format %q", format)
		}
		if !filepath.IsAbs(name) {
			name = filepath.Join(dir, name)
		}
		return Open(name, Options{ReadOnly: true, Backing: fileOpener(filepath.Dir(name))})
	}
	return open
}

// pattern fills b deterministically from seed.
func pattern(b []byte, seed int64) {
	r := rand.New(rand.NewSource(seed))
	r.Read(b)
}

// crashFile is an in-memory file that remembers which writes were
// synced. crash() returns the bytes a power cut would leave: everything
// synced, plus a random subset of the writes since the last sync.
type crashFile struct {
	mu      sync.Mutex
	cur     []byte
	durable []byte
	pending []pendingWrite
	syncs   int
	failAt  int // fail the n-th write (1-based) when > 0
	writes  int
}

type pendingWrite struct {
	off  int64
	data []byte // nil with trunc >= 0: a truncate
	trnc int64
}

func newCrashFile(b []byte) *crashFile {
	return &crashFile{cur: append([]byte(nil), b...), durable: append([]byte(nil), b...)}
}

func (c *crashFile) ReadAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if off < 0 {
		return 0, fmt.Errorf("negative offset %d", off)
	}
	if off >= int64(len(c.cur)) {
		return 0, fmt.Errorf("read past EOF: %w", io.EOF)
	}
	n := copy(p, c.cur[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func apply(buf []byte, w pendingWrite) []byte {
	if w.data == nil {
		if int64(len(buf)) > w.trnc {
			return buf[:w.trnc]
		}
		return append(buf, make([]byte, w.trnc-int64(len(buf)))...)
	}
	if end := w.off + int64(len(w.data)); end > int64(len(buf)) {
		buf = append(buf, make([]byte, end-int64(len(buf)))...)
	}
	copy(buf[w.off:], w.data)
	return buf
}

func (c *crashFile) WriteAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.writes++
	if off < 0 {
		return 0, fmt.Errorf("negative offset %d", off)
	}
	if c.failAt > 0 && c.writes == c.failAt {
		return 0, fmt.Errorf("injected write failure")
	}
	w := pendingWrite{off: off, data: append([]byte{}, p...)}
	c.cur = apply(c.cur, w)
	c.pending = append(c.pending, w)
	return len(p), nil
}

func (c *crashFile) Punch(off, n int64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	n = min(n, int64(len(c.cur))-off)
	if n <= 0 {
		return nil
	}
	w := pendingWrite{off: off, data: make([]byte, n)}
	c.cur = apply(c.cur, w)
	c.pending = append(c.pending, w)
	return nil
}

func (c *crashFile) Sync() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, w := range c.pending {
		c.durable = apply(c.durable, w)
	}
	c.pending = c.pending[:0]
	c.syncs++
	return nil
}

func (c *crashFile) Size() (int64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return int64(len(c.cur)), nil
}

func (c *crashFile) Truncate(n int64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	w := pendingWrite{trnc: n}
	c.cur = apply(c.cur, w)
	c.pending = append(c.pending, w)
	return nil
}

func (c *crashFile) Close() error { return nil }

func (c *crashFile) crash(r *rand.Rand) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := append([]byte(nil), c.durable...)
	for _, w := range c.pending {
		if r.Intn(2) == 0 {
			out = apply(out, w)
		}
	}
	return out
}

func (c *crashFile) bytes() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]byte(nil), c.cur...)
}
