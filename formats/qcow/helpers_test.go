package qcow

import (
	"encoding/binary"
	"math/rand/v2"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/crashfs"
)

// newMemFile is a durable in-memory host file holding b.
func newMemFile(b []byte) *crashfs.File { return crashfs.NewFile(b) }

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
		if !image.IsZero(b.data[pos:end]) {
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
func newMem(t testing.TB, opts CreateOptions) *crashfs.File {
	t.Helper()
	h, err := createHeader(opts)
	if err != nil {
		t.Fatal(err)
	}
	return newMemFile(initialFile(h))
}

func openMem(t testing.TB, m *crashfs.File, backing image.Image) *Image {
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
