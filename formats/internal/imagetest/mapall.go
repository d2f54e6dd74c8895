package imagetest

import (
	"testing"

	"github.com/blktap-go/blktap/formats/image"
)

// MapAll maps the whole of img, fails t on an error, and checks with
// Tiles that the extents cover it.
func MapAll(t testing.TB, img image.Image) []image.Extent {
	t.Helper()
	ext, err := img.Map(0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	Tiles(t, ext, img.Size())
	return ext
}

// Tiles fails t unless ext tiles [0, size): in order, no gap, no overlap,
// none empty, the last ending at size.
func Tiles(t testing.TB, ext []image.Extent, size int64) {
	t.Helper()
	var pos int64
	for _, x := range ext {
		if x.Offset != pos || x.Length <= 0 {
			t.Fatalf("map not contiguous at %d: %+v", pos, x)
		}
		pos += x.Length
	}
	if pos != size {
		t.Fatalf("map covers %d of %d", pos, size)
	}
}

// FirstDiff is the first offset where a and b differ, counting a length
// difference as one at the shorter's end, or -1 when they are equal.
func FirstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}
