package imagetest

import (
	"math/rand/v2"
	"os"
	"testing"
)

// Pattern is n bytes of seeded noise: the same for the same seed, so a
// test can write it and later compare what it reads against a fresh copy.
func Pattern(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// ChangedOnly reads the file at path and fails t unless it is as long as
// orig and differs from it only inside the [from, to) ranges given; it
// returns what it read. It proves a refused write touched nothing else.
func ChangedOnly(t testing.TB, path string, orig []byte, ranges ...[2]int) []byte {
	t.Helper()
	now, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(now) != len(orig) {
		t.Fatalf("file size %d -> %d", len(orig), len(now))
	}
	for i := range orig {
		if now[i] != orig[i] && !inRanges(i, ranges) {
			t.Fatalf("byte %#x changed", i)
		}
	}
	return now
}

func inRanges(i int, ranges [][2]int) bool {
	for _, r := range ranges {
		if i >= r[0] && i < r[1] {
			return true
		}
	}
	return false
}
