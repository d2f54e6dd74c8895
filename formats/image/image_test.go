package image

import (
	"errors"
	"math"
	"testing"
)

// TestCheckRange64: the boundaries, and no overflow near MaxInt64.
func TestCheckRange64(t *testing.T) {
	for _, c := range []struct {
		off, length, size int64
		ok                bool
	}{
		{0, 0, 0, true},
		{0, 4096, 4096, true},
		{4096, 0, 4096, true},
		{4095, 1, 4096, true},
		{4096, 1, 4096, false},
		{4097, 0, 4096, false},
		{0, 4097, 4096, false},
		{-1, 1, 4096, false},
		{0, -1, 4096, false},
		{1, math.MaxInt64, 4096, false},
		{math.MaxInt64, 1, math.MaxInt64, false},
	} {
		err := CheckRange64(c.off, c.length, c.size)
		if (err == nil) != c.ok || (err != nil && !errors.Is(err, ErrOutOfRange)) {
			t.Errorf("CheckRange64(%d, %d, %d) = %v, want ok=%v", c.off, c.length, c.size, err, c.ok)
		}
	}
	if err := CheckRange(4090, 8, 4096); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("CheckRange past the end: %v", err)
	}
}

// bytesImage is a read-only Image over a byte slice.
type bytesImage []byte

func (b bytesImage) ReadAt(p []byte, off int64) (int, error) {
	if err := CheckRange(off, len(p), int64(len(b))); err != nil {
		return 0, err
	}
	return copy(p, b[off:]), nil
}
func (b bytesImage) WriteAt([]byte, int64) (int, error) { return 0, ErrReadOnly }
func (b bytesImage) Size() int64                        { return int64(len(b)) }
func (b bytesImage) Flush() error                       { return nil }
func (b bytesImage) Discard(int64, int64) error         { return ErrReadOnly }
func (b bytesImage) Map(int64, int64) ([]Extent, error) { return nil, ErrUnsupported }
func (b bytesImage) Close() error                       { return nil }

// TestReadBacking: the backing's bytes inside it, zeros past its end and
// without one; stale bytes in p never survive.
func TestReadBacking(t *testing.T) {
	back := bytesImage("0123456789")
	for _, c := range []struct {
		backing Image
		off     int64
		n       int
		want    string
	}{
		{back, 2, 4, "2345"},
		{back, 8, 4, "89\x00\x00"},
		{back, 10, 3, "\x00\x00\x00"},
		{back, 50, 2, "\x00\x00"},
		{nil, 0, 3, "\x00\x00\x00"},
	} {
		p := []byte("xxxxxxxx"[:c.n])
		if err := ReadBacking(c.backing, p, c.off); err != nil || string(p) != c.want {
			t.Errorf("ReadBacking(off %d, %d bytes) = %q, %v; want %q", c.off, c.n, p, err, c.want)
		}
	}
}

// TestAppendExtent: runs merge only when contiguous with the same kind and
// depth; empty runs vanish.
func TestAppendExtent(t *testing.T) {
	var got []Extent
	for _, x := range []Extent{
		{0, 512, Data, 0},
		{512, 512, Data, 0},  // merges
		{1024, 0, Zero, 0},   // dropped
		{1024, 512, Data, 1}, // other depth
		{1536, 512, Zero, 1}, // other kind
		{2048, 512, Zero, 1}, // merges
		{4096, 512, Zero, 1}, // a gap: not contiguous
	} {
		got = AppendExtent(got, x)
	}
	want := []Extent{{0, 1024, Data, 0}, {1024, 512, Data, 1}, {1536, 1024, Zero, 1}, {4096, 512, Zero, 1}}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
}

func TestIsZero(t *testing.T) {
	for n := 0; n < 40; n++ {
		b := make([]byte, n)
		if !IsZero(b) {
			t.Fatalf("%d zero bytes: not zero", n)
		}
		for i := range b {
			b[i] = 1
			if IsZero(b) {
				t.Fatalf("%d bytes with byte %d set: zero", n, i)
			}
			b[i] = 0
		}
	}
}
