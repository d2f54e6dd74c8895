package image

import "testing"

// IsZero over lengths around its block and one nonzero byte anywhere,
// including past the first block.
func TestIsZeroBlocks(t *testing.T) {
	const blk = len(zeroBlock)
	for _, n := range []int{0, 1, 7, 8, 9, 4095, blk - 1, blk, blk + 1, 3*blk + 5} {
		b := make([]byte, n)
		if !IsZero(b) {
			t.Fatalf("%d zero bytes: not zero", n)
		}
		for _, at := range []int{0, n / 2, n - 1, blk, 2*blk + 3} {
			if at < 0 || at >= n {
				continue
			}
			b[at] = 0x80
			if IsZero(b) {
				t.Fatalf("len %d with byte %d set: zero", n, at)
			}
			b[at] = 0
		}
	}
	if zeroBlock != [blk]byte{} {
		t.Fatal("zeroBlock was written")
	}
}

// The zero check of every chunk image convert reads (64 KiB).
func BenchmarkIsZero(b *testing.B) {
	buf := make([]byte, 64<<10)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		IsZero(buf)
	}
}
