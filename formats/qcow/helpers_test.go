package qcow

import (
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
)

var errCrashed = errors.New("memfile: crashed")

// memFile is an in-memory storage that remembers which writes were synced,
// so a test can simulate a power cut: crashImage keeps the synced state
// plus a random subset of the writes since the last Sync. A write budget
// makes every write and sync after the budget fail (a crash mid-operation).
type memFile struct {
	mu       sync.Mutex
	data     []byte
	durable  []byte
	pending  []memWrite
	budget   int // writes left before the crash; <0 = unlimited
	crashed  bool
	syncs    int
	closed   bool
	noPunch  bool
	writeErr error // if set, every WriteAt fails with it
}

type memWrite struct {
	off  int64
	data []byte
}

func newMemFile(b []byte) *memFile {
	return &memFile{data: append([]byte(nil), b...), durable: append([]byte(nil), b...), budget: -1}
}

func (m *memFile) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off >= int64(len(m.data)) {
		return 0, io.EOF
	}
	n := copy(p, m.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memFile) writeLocked(p []byte, off int64) {
	if end := off + int64(len(p)); end > int64(len(m.data)) {
		m.data = append(m.data, make([]byte, end-int64(len(m.data)))...)
	}
	copy(m.data[off:], p)
	m.pending = append(m.pending, memWrite{off, append([]byte(nil), p...)})
}

func (m *memFile) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.writeErr != nil {
		return 0, m.writeErr
	}
	if m.crashed || m.budget == 0 {
		m.crashed = true
		return 0, errCrashed
	}
	if m.budget > 0 {
		m.budget--
	}
	m.writeLocked(p, off)
	return len(p), nil
}

func (m *memFile) PunchHole(off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.crashed {
		return errCrashed
	}
	if off >= int64(len(m.data)) {
		return nil
	}
	n = min(n, int64(len(m.data))-off)
	m.writeLocked(make([]byte, n), off)
	return nil
}

func (m *memFile) Sync() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.crashed {
		return errCrashed
	}
	m.syncs++
	for _, w := range m.pending {
		if end := w.off + int64(len(w.data)); end > int64(len(m.durable)) {
			m.durable = append(m.durable, make([]byte, end-int64(len(m.durable)))...)
		}
		copy(m.durable[w.off:], w.data)
	}
	m.pending = m.pending[:0]
	return nil
}

func (m *memFile) Size() (int64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return int64(len(m.data)), nil
}

func (m *memFile) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	return nil
}

// crashImage is what a disk could hold after a power cut now: the synced
// bytes plus each unsynced write kept or dropped at random, in order.
func (m *memFile) crashImage(rng *rand.Rand) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := append([]byte(nil), m.durable...)
	for _, w := range m.pending {
		if rng.IntN(2) == 0 {
			continue
		}
		if end := w.off + int64(len(w.data)); end > int64(len(out)) {
			out = append(out, make([]byte, end-int64(len(out)))...)
		}
		copy(out[w.off:], w.data)
	}
	return out
}

// memImage is a plain image.Image over a byte slice, used as a backing
// image. Runs of zeros map as holes so Map depths can be tested.
type memImage struct {
	data   []byte
	closed bool
}

func (b *memImage) ReadAt(p []byte, off int64) (int, error) {
	if err := image.CheckRange(off, len(p), int64(len(b.data))); err != nil {
		return 0, err
	}
	return copy(p, b.data[off:]), nil
}
func (b *memImage) WriteAt(p []byte, off int64) (int, error) { return 0, image.ErrReadOnly }
func (b *memImage) Size() int64                              { return int64(len(b.data)) }
func (b *memImage) Flush() error                             { return nil }
func (b *memImage) Discard(off, n int64) error               { return image.ErrReadOnly }
func (b *memImage) Close() error                             { b.closed = true; return nil }
func (b *memImage) Map(off, n int64) ([]image.Extent, error) {
	var out []image.Extent
	const grain = 512
	for pos := off; pos < off+n; {
		end := min(off+n, (pos/grain+1)*grain)
		kind := image.Hole
		if !isZero(b.data[pos:end]) {
			kind = image.Data
		}
		if k := len(out); k > 0 && out[k-1].Kind == kind {
			out[k-1].Length += end - pos
		} else {
			out = append(out, image.Extent{Offset: pos, Length: end - pos, Kind: kind})
		}
		pos = end
	}
	return out, nil
}

// newMem makes a fresh image in memory with Create's layout.
func newMem(t testing.TB, opts CreateOptions) *memFile {
	t.Helper()
	h, err := createHeader(opts)
	if err != nil {
		t.Fatal(err)
	}
	return newMemFile(initialFile(h))
}

func openMem(t testing.TB, m *memFile, backing image.Image) *Image {
	t.Helper()
	var opts Options
	if backing != nil {
		opts.Backing = func(name, format string) (image.Image, error) { return backing, nil }
	}
	img, err := openStorage(m, "mem", opts)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func randBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n+8)
	for i := 0; i < n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], rng.Uint64())
	}
	return b[:n]
}
