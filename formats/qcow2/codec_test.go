package qcow2

import (
	"bytes"
	"math/rand/v2"
	"testing"
)

// TestDeflateWindow: a run repeated 5000 bytes on is out of reach of
// qemu's 4 KiB window, so it must cost its full length again; 3000 bytes
// on it is in reach and must be matched.
func TestDeflateWindow(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	for _, c := range []struct {
		gap    int
		within bool
	}{{3000, true}, {5000, false}} {
		r := fill(rng, c.gap)
		src := append(append([]byte(nil), r...), r...)
		z, err := deflateCodec{}.compress(nil, src)
		if err != nil {
			t.Fatal(err)
		}
		if matched := len(z) < c.gap*3/2; matched != c.within {
			t.Errorf("repeat at distance %d: %d compressed bytes; matched %v, want %v", c.gap, len(z), matched, c.within)
		}
		back := make([]byte, len(src))
		if err := (deflateCodec{}).decompress(back, z); err != nil || !bytes.Equal(back, src) {
			t.Errorf("distance %d: round trip: %v", c.gap, err)
		}
	}
}

// TestCodecTrailingBytes: a compressed cluster is read with the rest of
// its last sector, which is not part of the stream; both codecs stop at
// the end of the cluster. Damaged data is an error, never a panic.
func TestCodecTrailingBytes(t *testing.T) {
	rng := rand.New(rand.NewPCG(8, 8))
	src := bytes.Repeat(append(fill(rng, 300), "some text to match "...), 300)[:65536]
	for _, c := range []codec{deflateCodec{}, zstdCodec{}} {
		z, err := c.compress(nil, src)
		if err != nil {
			t.Fatal(err)
		}
		padded := append(z, fill(rng, 511)...)
		dst := make([]byte, len(src))
		if err := c.decompress(dst, padded); err != nil || !bytes.Equal(dst, src) {
			t.Errorf("%s: with trailing bytes: %v", c.name(), err)
		}
		bad := append([]byte(nil), z...)
		for i := 4; i < len(bad); i += 7 {
			bad[i] ^= 0x5a
		}
		if err := c.decompress(dst, bad); err == nil && bytes.Equal(dst, src) {
			t.Errorf("%s: damaged stream decoded to the original", c.name())
		}
		if err := c.decompress(dst, z[:len(z)/2]); err == nil {
			t.Errorf("%s: half a stream filled a whole cluster", c.name())
		}
	}
}
