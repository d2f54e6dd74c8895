// Package imagetest holds what the formats' tests and benchmarks share
// about any image.Image. It is imported only from _test.go files.
package imagetest

import (
	"math/rand/v2"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
)

// Random4K is the body of a random 4 KiB I/O benchmark: b's loop reads
// (or, with write, overwrites) 4 KiB at aligned offsets all over img. The
// seed is fixed by the caller, so two runs touch the same offsets.
func Random4K(b *testing.B, img image.Image, seed uint64, write bool) {
	io := img.ReadAt
	if write {
		io = img.WriteAt
	}
	buf := make([]byte, 4096)
	rng := rand.New(rand.NewPCG(seed, seed))
	b.SetBytes(4096)
	b.ResetTimer()
	for b.Loop() {
		if _, err := io(buf, rng.Int64N(img.Size()/4096)*4096); err != nil {
			b.Fatal(err)
		}
	}
}
