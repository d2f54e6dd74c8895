package formats

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/blktap-go/blktap/internal/oracle"
)

// convertSource is a raw file with data in scattered places (a chunk
// straddling two convert blocks, a lone sector, the last bytes) and an
// all-zero chunk that was written, so convert must not allocate it.
func convertSource(t *testing.T, dir string) (string, []byte) {
	t.Helper()
	const size = 9<<20 + 4096
	want := make([]byte, size)
	for i := range want[convertBlock-4096 : convertBlock+8192] {
		want[convertBlock-4096+i] = byte(i*7 + 1)
	}
	copy(want[5<<20+512:], bytes.Repeat([]byte{0xA5}, 512))
	copy(want[size-100:], bytes.Repeat([]byte{0x3C}, 100))
	p := filepath.Join(dir, "in.raw")
	if err := os.WriteFile(p, want, 0o644); err != nil {
		t.Fatal(err)
	}
	return p, want
}

// ConvertWith to each writable format, plain and compressed, read back by
// qemu-img: the output must compare equal to the source.
func TestConvertWithQemuCompare(t *testing.T) {
	qi := oracle.Require(t, "qemu-img")
	dir := t.TempDir()
	src, want := convertSource(t, dir)
	for _, c := range []struct {
		format, qemu string
		compress     bool
	}{{"qcow2", "qcow2", false}, {"qcow2", "qcow2", true}, {"vhd", "vpc", false}, {"vmdk", "vmdk", false}, {"raw", "raw", false}} {
		name := c.format
		if c.compress {
			name += "-compressed"
		}
		t.Run(name, func(t *testing.T) {
			in, err := Open("raw", src, Options{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer in.Close()
			out := filepath.Join(dir, name+".img")
			var mu sync.Mutex
			var last, calls int64
			progress := func(done, total int64) {
				mu.Lock()
				defer mu.Unlock()
				if total != int64(len(want)) || done > total {
					t.Errorf("progress(%d, %d) for a %d-byte source", done, total, len(want))
				}
				last, calls = done, calls+1
			}
			err = ConvertWith(context.Background(), in, c.format, out, CreateOptions{}, ConvertOptions{Progress: progress, Compress: c.compress})
			if err != nil {
				t.Fatal(err)
			}
			if last != int64(len(want)) || calls < 2 {
				t.Errorf("progress ended at %d after %d calls, want %d", last, calls, len(want))
			}
			if o, err := exec.Command(qi, "compare", "-f", "raw", "-F", c.qemu, src, out).CombinedOutput(); err != nil {
				t.Errorf("qemu-img compare: %v\n%s", err, o)
			}
		})
	}
}

type failingReader struct {
	Image
	at int64
}

func (f failingReader) ReadAt(p []byte, off int64) (int, error) {
	if off <= f.at && f.at < off+int64(len(p)) {
		return 0, errors.New("injected read failure")
	}
	return f.Image.ReadAt(p, off)
}

// A read that fails mid-way fails the conversion and removes the partial
// output; so does a compressed conversion to a format that cannot compress.
func TestConvertWithFailures(t *testing.T) {
	dir := t.TempDir()
	src, _ := convertSource(t, dir)
	in, err := Open("raw", src, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out := filepath.Join(dir, "out.qcow2")
	err = ConvertWith(context.Background(), failingReader{in, 5<<20 + 600}, "qcow2", out, CreateOptions{}, ConvertOptions{})
	if err == nil || !bytes.Contains([]byte(err.Error()), []byte("injected read failure")) {
		t.Errorf("convert over a failing read: %v", err)
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("partial output left behind: %v", err)
	}
	err = ConvertWith(context.Background(), in, "vhd", out, CreateOptions{}, ConvertOptions{Compress: true})
	if !errors.Is(err, ErrUnsupported) {
		t.Errorf("compressed vhd: %v, want ErrUnsupported", err)
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("output left behind after a refused compression: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := ConvertWith(ctx, in, "qcow2", out, CreateOptions{}, ConvertOptions{}); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled convert: %v", err)
	}
}
