package formats

import "testing"

// allZero over lengths around its block and one nonzero byte anywhere,
// including past the first block.
func TestAllZero(t *testing.T) {
	for _, n := range []int{0, 1, 7, 8, 9, 4095, convertBlock - 1, convertBlock, convertBlock + 1, 3*convertBlock + 5} {
		b := make([]byte, n)
		if !allZero(b) {
			t.Fatalf("%d zero bytes: not zero", n)
		}
		for _, at := range []int{0, n / 2, n - 1, convertBlock, 2*convertBlock + 3} {
			if at < 0 || at >= n {
				continue
			}
			b[at] = 0x80
			if allZero(b) {
				t.Fatalf("len %d with byte %d set: zero", n, at)
			}
			b[at] = 0
		}
	}
	if zeroBlock != [convertBlock]byte{} {
		t.Fatal("zeroBlock was written")
	}
}

// The zero check of every chunk image convert reads.
func BenchmarkAllZero(b *testing.B) {
	buf := make([]byte, convertBlock)
	b.SetBytes(convertBlock)
	for b.Loop() {
		allZero(buf)
	}
}
