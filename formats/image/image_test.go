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
