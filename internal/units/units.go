package units

import (
	"errors"
	"fmt"
	"math"
	"math/big"
	"strconv"
	"strings"
)

// ErrBadSize: a size string ParseSize cannot read.
var ErrBadSize = errors.New("bad size")

// units are the binary multipliers, as qemu-img uses them: K = 1024.
var units = []struct {
	suffix byte
	mul    int64
}{
	{'E', 1 << 60}, {'P', 1 << 50}, {'T', 1 << 40}, {'G', 1 << 30}, {'M', 1 << 20}, {'K', 1 << 10},
}

// ParseSize reads a size in bytes the way qemu-img does, a little stricter:
//
//	"123"  "123B"           bytes
//	"4K" "512M" "4G" "1T"   binary units K M G T P E (either case; K = 1024)
//	"4GiB" "512MiB"         the same, spelled out
//	"1.5G"                  a decimal fraction, if it comes to whole bytes
//
// "4GB" is refused (is it 4*10^9 or 4*2^30?), as are signs, spaces,
// exponents, hex and anything past 2^63-1.
func ParseSize(s string) (int64, error) {
	bad := func(why string) (int64, error) {
		return 0, fmt.Errorf("%w %q: %s (write e.g. 512, 100K, 512M, 4G, 1.5T)", ErrBadSize, s, why)
	}
	if s == "" {
		return bad("empty")
	}
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	intPart := s[:i]
	fracPart := ""
	if i < len(s) && s[i] == '.' {
		j := i + 1
		for j < len(s) && s[j] >= '0' && s[j] <= '9' {
			j++
		}
		fracPart, i = s[i+1:j], j
		if fracPart == "" {
			return bad("no digits after the decimal point")
		}
	}
	if intPart == "" {
		return bad("does not start with a number")
	}
	if len(intPart)+len(fracPart) > 40 {
		return bad("too many digits")
	}
	mul := int64(1)
	switch rest := s[i:]; {
	case rest == "", rest == "B", rest == "b":
	default:
		u := strings.ToUpper(rest[:1])[0]
		found := false
		for _, un := range units {
			if un.suffix == u {
				mul, found = un.mul, true
			}
		}
		if !found {
			return bad(fmt.Sprintf("unknown unit %q (K, M, G, T, P, E)", rest))
		}
		switch rest[1:] {
		case "", "iB":
		case "B", "b":
			return bad(fmt.Sprintf("%q is ambiguous; write %s or %siB for 1024-based", rest, rest[:1], rest[:1]))
		default:
			return bad(fmt.Sprintf("unknown unit %q (K, M, G, T, P, E)", rest))
		}
	}
	num := intPart
	if fracPart != "" {
		num += "." + fracPart
	}
	r, ok := new(big.Rat).SetString(num)
	if !ok {
		return bad("not a number")
	}
	r.Mul(r, new(big.Rat).SetInt64(mul))
	if !r.IsInt() {
		return bad("not a whole number of bytes")
	}
	n := r.Num()
	if !n.IsInt64() {
		return bad(fmt.Sprintf("larger than %d bytes", int64(math.MaxInt64)))
	}
	return n.Int64(), nil
}

// FormatSize writes n in the largest unit that holds it exactly ("4G",
// "1536M", "123"), so ParseSize(FormatSize(n)) == n for every n >= 0.
func FormatSize(n int64) string {
	if n > 0 {
		for _, u := range units {
			if n%u.mul == 0 {
				return strconv.FormatInt(n/u.mul, 10) + string(u.suffix)
			}
		}
	}
	return strconv.FormatInt(n, 10)
}
