package formats

import "github.com/blktap-go/blktap/internal/units"

// ErrBadSize: a size string ParseSize cannot read.
var ErrBadSize = units.ErrBadSize

// ParseSize reads a size in bytes as qemu-img does (K, M, G, T, P, E are
// powers of 1024), a little stricter; see internal/units.
func ParseSize(s string) (int64, error) { return units.ParseSize(s) }

// FormatSize writes n in the largest unit that keeps it exact, so
// ParseSize(FormatSize(n)) == n.
func FormatSize(n int64) string { return units.FormatSize(n) }
