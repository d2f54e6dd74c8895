package xenstore

import (
	"fmt"
	"strconv"
	"strings"
)

// Path limits (xs_wire.h).
const (
	AbsPathMax = 3072 // XENSTORE_ABS_PATH_MAX
	RelPathMax = 2048 // XENSTORE_REL_PATH_MAX
)

// Special watch paths: they name events, not nodes.
const (
	WatchIntroduceDomain = "@introduceDomain"
	WatchReleaseDomain   = "@releaseDomain"
)

// DomainPath is the home of a domain's relative paths: /local/domain/<domid>.
func DomainPath(domid uint32) string {
	return "/local/domain/" + strconv.FormatUint(uint64(domid), 10)
}

func validPathChar(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
		c == '-' || c == '/' || c == '_' || c == '@'
}

// CanonicalPath validates p as a node path of domain domid and returns its
// absolute form: relative paths resolve under DomainPath(domid). It
// rejects empty paths, characters outside A-Z a-z 0-9 - / _ @, "//", a
// trailing "/" (except the root), and paths longer than AbsPathMax once
// absolute, or longer than RelPathMax after a "/local/domain/<domid>/"
// prefix (or in all, without one). Paths starting with "@" name events, not nodes: they are
// accepted only when special is true (watches), as C xenstored does.
func CanonicalPath(domid uint32, p string, special bool) (string, error) {
	if p == "" {
		return "", fmt.Errorf("%w: empty path", ErrInvalid)
	}
	if p[0] == '@' && !special {
		return "", fmt.Errorf("%w: special path %q names no node", ErrInvalid, p)
	}
	abs := p
	if p[0] != '/' && p[0] != '@' {
		abs = DomainPath(domid) + "/" + p
	}
	if len(abs) > AbsPathMax {
		return "", fmt.Errorf("%w: path of %d bytes", ErrInvalid, len(abs))
	}
	if n := len(abs) - homePrefixLen(abs); n > RelPathMax {
		return "", fmt.Errorf("%w: path of %d bytes below a domain's home", ErrInvalid, n)
	}
	for i := 0; i < len(abs); i++ {
		c := abs[i]
		if !validPathChar(c) {
			return "", fmt.Errorf("%w: bad character %q in path", ErrInvalid, c)
		}
		if c == '/' && i > 0 && abs[i-1] == '/' {
			return "", fmt.Errorf("%w: empty element in path %q", ErrInvalid, p)
		}
	}
	if len(abs) > 1 && abs[len(abs)-1] == '/' {
		return "", fmt.Errorf("%w: trailing / in path %q", ErrInvalid, p)
	}
	return abs, nil
}

// homePrefixLen is the length of a leading "/local/domain/<domid>/" (up to
// five digits), else 0. C xenstored limits what follows it to RelPathMax
// bytes for every caller, dom0 included, and so do we.
func homePrefixLen(p string) int {
	const pre = "/local/domain/"
	if !strings.HasPrefix(p, pre) {
		return 0
	}
	i := len(pre)
	for i < len(p) && i-len(pre) < 5 && p[i] >= '0' && p[i] <= '9' {
		i++
	}
	if i == len(pre) || i >= len(p) || p[i] != '/' {
		return 0
	}
	return i + 1
}

// isUnder reports whether p is base or lies beneath it.
func isUnder(p, base string) bool {
	if base == "/" {
		return strings.HasPrefix(p, "/")
	}
	return p == base || strings.HasPrefix(p, base) && len(p) > len(base) && p[len(base)] == '/'
}

// parentOf returns the parent of an absolute, canonical path ("/" for "/a").
func parentOf(p string) string {
	i := strings.LastIndexByte(p, '/')
	if i <= 0 {
		return "/"
	}
	return p[:i]
}

// Access is one permission letter.
type Access byte

const (
	PermNone  Access = 'n'
	PermRead  Access = 'r'
	PermWrite Access = 'w'
	PermBoth  Access = 'b'
)

func (a Access) canRead() bool  { return a == PermRead || a == PermBoth }
func (a Access) canWrite() bool { return a == PermWrite || a == PermBoth }

// Perm grants Access to domain Domid. In a node's list the first entry names
// the owner (who always has full access) and its Access is the default for
// every domain not listed.
type Perm struct {
	Domid  uint32
	Access Access
}

// String renders the wire form: letter then decimal domid ("r5").
func (p Perm) String() string {
	return string(rune(p.Access)) + strconv.FormatUint(uint64(p.Domid), 10)
}

// ParsePerm parses the wire form: one of n r w b, then a decimal domid.
// The domid is required: a bare "w" is invalid.
func ParsePerm(s string) (Perm, error) {
	if len(s) < 2 {
		return Perm{}, fmt.Errorf("%w: permission %q", ErrInvalid, s)
	}
	a := Access(s[0])
	switch a {
	case PermNone, PermRead, PermWrite, PermBoth:
	default:
		return Perm{}, fmt.Errorf("%w: permission letter in %q", ErrInvalid, s)
	}
	for i := 1; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return Perm{}, fmt.Errorf("%w: domid in permission %q", ErrInvalid, s)
		}
	}
	id, err := strconv.ParseUint(s[1:], 10, 32)
	if err != nil {
		return Perm{}, fmt.Errorf("%w: domid in permission %q", ErrInvalid, s)
	}
	return Perm{Domid: uint32(id), Access: a}, nil
}

// accessFor computes what domid may do on a node with perms.
func accessFor(perms []Perm, domid uint32) Access {
	if len(perms) == 0 {
		return PermNone
	}
	if perms[0].Domid == domid {
		return PermBoth
	}
	for _, p := range perms[1:] {
		if p.Domid == domid {
			return p.Access
		}
	}
	return perms[0].Access
}

func permsPayload(perms []Perm) []byte {
	s := make([]string, len(perms))
	for i, p := range perms {
		s[i] = p.String()
	}
	return joinStrings(s...)
}
