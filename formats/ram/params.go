package ram

import (
	"errors"
	"fmt"
	"math/bits"
	"net/url"
	"strconv"
	"strings"
)

// ErrBadName: a RAM disk name outside [A-Za-z0-9._-]{1,128}, or "." / "..".
var ErrBadName = errors.New("bad RAM disk name")

// ErrBadParams: params that ParseParams cannot read.
var ErrBadParams = errors.New("bad RAM disk params")

// MaxNameLen is the longest name accepted; with the file prefix it stays
// far below NAME_MAX (255).
const MaxNameLen = 128

// ValidateName checks that name is usable as a RAM disk name: 1 to 128
// characters from [A-Za-z0-9._-], not "." or "..". Names become file names,
// so nothing that could reach another directory gets through.
func ValidateName(name string) error {
	if name == "" {
		return fmt.Errorf("%w: empty", ErrBadName)
	}
	if len(name) > MaxNameLen {
		return fmt.Errorf("%w: %d characters, at most %d", ErrBadName, len(name), MaxNameLen)
	}
	if name == "." || name == ".." {
		return fmt.Errorf("%w %q", ErrBadName, name)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-'
		if !ok {
			return fmt.Errorf("%w %q: character %q at %d (use A-Z a-z 0-9 . _ -)", ErrBadName, name, c, i)
		}
	}
	return nil
}

// ParseParams reads the params of a RAM disk:
//
//	NAME              attach the existing disk NAME (its size is taken)
//	NAME?size=SIZE    attach NAME, creating it with SIZE bytes if missing;
//	                  an existing disk of another size is an error
//	ram:NAME...       the same with the format prefix (xenstore "params")
//
// SIZE is bytes, or a number with a binary unit K M G T P E (1K = 1024),
// optionally spelled KiB, MiB...; "4GB" is refused as ambiguous. The
// returned size is 0 when none is given.
func ParseParams(params string) (name string, size int64, err error) {
	p := strings.TrimPrefix(params, "ram:")
	name, query, hasQuery := strings.Cut(p, "?")
	if err := ValidateName(name); err != nil {
		return "", 0, fmt.Errorf("%w %q: %w", ErrBadParams, params, err)
	}
	if !hasQuery {
		return name, 0, nil
	}
	if query == "" {
		return "", 0, fmt.Errorf("%w %q: empty query after '?' (write NAME?size=1G)", ErrBadParams, params)
	}
	for _, kv := range strings.Split(query, "&") {
		k, v, _ := strings.Cut(kv, "=")
		if k != "size" {
			return "", 0, fmt.Errorf("%w %q: unknown parameter %q (only size=SIZE)", ErrBadParams, params, k)
		}
		if size != 0 {
			return "", 0, fmt.Errorf("%w %q: size given twice", ErrBadParams, params)
		}
		if v, err = url.QueryUnescape(v); err != nil {
			return "", 0, fmt.Errorf("%w %q: %w", ErrBadParams, params, err)
		}
		if size, err = ParseSize(v); err != nil {
			return "", 0, fmt.Errorf("%w %q: %w", ErrBadParams, params, err)
		}
		if size == 0 {
			return "", 0, fmt.Errorf("%w %q: size must be more than 0", ErrBadParams, params)
		}
	}
	return name, size, nil
}

// ParseSize reads "512", "64K", "1G", "1GiB": bytes with an optional
// binary unit. It exists here because package formats, which has the
// full-featured parser, imports this package.
func ParseSize(s string) (int64, error) {
	bad := func(why string) (int64, error) {
		return 0, fmt.Errorf("bad size %q: %s (write e.g. 512, 64K, 512M, 4G)", s, why)
	}
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	if i == 0 {
		return bad("does not start with a digit")
	}
	if i > 19 {
		return bad("too many digits")
	}
	n, err := strconv.ParseUint(s[:i], 10, 64)
	if err != nil {
		return bad("not a number")
	}
	shift := 0
	switch rest := s[i:]; rest {
	case "", "B", "b":
	default:
		shift = strings.IndexByte("KMGTPE", rest[0]&^0x20) // upper-case the letter
		if shift < 0 || (rest[1:] != "" && rest[1:] != "iB") {
			return bad(fmt.Sprintf("unknown unit %q (K M G T P E, 1K = 1024)", rest))
		}
		shift = 10 * (shift + 1)
	}
	if n > MaxSize || bits.LeadingZeros64(n) < shift || n<<shift > MaxSize {
		return bad(fmt.Sprintf("more than the maximum %d bytes", int64(MaxSize)))
	}
	return int64(n << shift), nil
}
