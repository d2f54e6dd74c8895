package image

import "encoding/binary"

// IsZero reports whether every byte of b is zero: the test a converter
// makes before it writes a block, and a parser before it trusts a
// reserved field. It compares eight bytes at a time.
func IsZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.NativeEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
