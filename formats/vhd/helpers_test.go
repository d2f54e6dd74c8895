package vhd

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/crashfs"
	"github.com/blktap-go/blktap/internal/oracle"
)

func runCmd(t testing.TB, name string, args ...string) string {
	t.Helper()
	return oracle.Run(t, name, args...)
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

// newCrashFile is a durable in-memory host file holding b.
func newCrashFile(b []byte) *crashfs.File { return crashfs.NewFile(b) }
