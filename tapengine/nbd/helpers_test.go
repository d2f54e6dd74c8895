package nbd

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/internal/testutil"
)

// fileBackend is a raw file served as is: the test's stand-in for
// formats/raw, kept in-package so these tests depend on nothing else.
type fileBackend struct {
	f    *os.File
	size int64
}

func newFileBackend(t testing.TB, size int64) (*fileBackend, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.raw")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &fileBackend{f: f, size: size}, p
}

func (b *fileBackend) Size() int64 { return b.size }

func (b *fileBackend) ReadAt(p []byte, off int64) (int, error) {
	if err := image.CheckRange(off, len(p), b.size); err != nil {
		return 0, err
	}
	n, err := b.f.ReadAt(p, off)
	if err == io.EOF && n == len(p) {
		err = nil
	}
	return n, err
}

func (b *fileBackend) WriteAt(p []byte, off int64) (int, error) {
	if err := image.CheckRange(off, len(p), b.size); err != nil {
		return 0, err
	}
	return b.f.WriteAt(p, off)
}

func (b *fileBackend) Flush() error { return unix.Fdatasync(int(b.f.Fd())) }

func (b *fileBackend) Discard(off, n int64) error {
	if err := image.CheckRange(off, 0, b.size); err != nil || n > b.size-off {
		return image.ErrOutOfRange
	}
	return unix.Fallocate(int(b.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

// WriteZeroes zeroes a range with fallocate, as qemu's file driver
// does: punching a hole when allowed, else ZERO_RANGE. An EOPNOTSUPP
// matches errors.ErrUnsupported, so the server falls back.
func (b *fileBackend) WriteZeroes(off, n int64, mayTrim bool) error {
	if off < 0 || n < 0 || off > b.size || n > b.size-off {
		return image.ErrOutOfRange
	}
	mode := uint32(unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE)
	if mayTrim {
		mode = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
	}
	return unix.Fallocate(int(b.f.Fd()), mode, off, n)
}

// Map reports data and holes with SEEK_DATA / SEEK_HOLE.
func (b *fileBackend) Map(off, n int64) ([]image.Extent, error) {
	if off < 0 || n < 0 || off > b.size || n > b.size-off {
		return nil, image.ErrOutOfRange
	}
	end := off + n
	var out []image.Extent
	fd := int(b.f.Fd())
	for pos := off; pos < end; {
		d, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			d = end
		} else if err != nil {
			return nil, err
		}
		d = min(d, end)
		if d > pos {
			out = append(out, image.Extent{Offset: pos, Length: d - pos, Kind: image.Hole, Depth: 1})
			pos = d
			continue
		}
		h, err := unix.Seek(fd, pos, unix.SEEK_HOLE)
		if err != nil {
			return nil, err
		}
		h = min(h, end)
		out = append(out, image.Extent{Offset: pos, Length: h - pos, Kind: image.Data})
		pos = h
	}
	return out, nil
}

// memBackend is an in-memory disk for benchmarks and fuzzing.
type memBackend struct {
	mu      sync.RWMutex
	data    []byte
	flushes int
}

func (m *memBackend) Size() int64 { return int64(len(m.data)) }
func (m *memBackend) ReadAt(p []byte, off int64) (int, error) {
	if err := image.CheckRange(off, len(p), m.Size()); err != nil {
		return 0, err
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return copy(p, m.data[off:]), nil
}
func (m *memBackend) WriteAt(p []byte, off int64) (int, error) {
	if err := image.CheckRange(off, len(p), m.Size()); err != nil {
		return 0, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(m.data[off:], p), nil
}
func (m *memBackend) Flush() error {
	m.mu.Lock()
	m.flushes++
	m.mu.Unlock()
	return nil
}

// startServer serves be on a fresh unix socket and returns the NBD URI.
func startServer(t testing.TB, exp Export) (*Server, string, string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "nbd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{Export: exp}
	testutil.Serve(t, s, ln)
	return s, sock, fmt.Sprintf("nbd+unix:///%s?socket=%s", exp.Name, sock)
}
