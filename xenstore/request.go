package xenstore

import (
	"bytes"
	"strconv"
	"strings"
)

// request is a message's arguments after parsing: counted, converted and
// validated before anything looks at the tree or the connection. Paths
// are canonical (absolute, checked characters and lengths), permissions
// and domain ids are numbers. Each operation fills only its own fields.
// Parsing fails only with EINVAL.
type request struct {
	tx uint32 // the header's transaction id

	path    string // canonical node path; for WATCH and UNWATCH it may be an @ name
	special string // GET_PERMS, SET_PERMS on an @ pseudo-node: its name
	asSent  string // WATCH: the path as the client wrote it, the form its events use
	token   string // WATCH, UNWATCH
	value   []byte // WRITE
	perms   []Perm // SET_PERMS
	offset  int    // DIRECTORY_PART: byte offset into the list of names
	commit  bool   // TRANSACTION_END: T commits, F discards

	// domids are the domain arguments, in order. RESUME and SET_TARGET
	// check each argument in turn, parse then existence, so a malformed
	// one stops the list and sets badDomid: an unknown domain named
	// before it still answers ENOENT.
	domids   []uint32
	badDomid bool

	control string // CONTROL: the subcommand
	text    string // CONTROL print: what to log
}

// args are a payload's NUL-terminated strings. They are kept joined, as
// one copy of the payload, and cut out on demand, so that reading a
// request's arguments costs a single allocation.
type args struct {
	domid  uint32 // the requester's: relative paths resolve under its home
	raw    []byte
	joined string // the strings without their final NUL
	count  int    // how many strings; 0 when the payload lacks the final NUL
}

func newArgs(domid uint32, payload []byte) args {
	a := args{domid: domid, raw: payload}
	if n := len(payload); n > 0 && payload[n-1] == 0 {
		a.joined = string(payload[:n-1])
		a.count = strings.Count(a.joined, "\x00") + 1
	}
	return a
}

func (a args) exactly(n int) bool { return a.count == n }
func (a args) atLeast(n int) bool { return a.count >= n }

// arg returns string i; i must be below count.
func (a args) arg(i int) string {
	rest := a.joined
	for ; i > 0; i-- {
		_, rest, _ = strings.Cut(rest, "\x00")
	}
	s, _, _ := strings.Cut(rest, "\x00")
	return s
}

// from returns the strings from i on, still joined, for nextArg.
func (a args) from(i int) string {
	rest := a.joined
	for ; i > 0; i-- {
		_, rest, _ = strings.Cut(rest, "\x00")
	}
	return rest
}

// nextArg cuts the first string off what from returned.
func nextArg(rest string) (s, after string) {
	s, after, _ = strings.Cut(rest, "\x00")
	return s, after
}

// nodePath canonicalises argument i as the path of a node (no @ names).
func (a args) nodePath(i int) (string, error) {
	return CanonicalPath(a.domid, a.arg(i), false)
}

// nodeOrSpecial reads the first argument of GET_PERMS and SET_PERMS,
// which names a node or one of the @ pseudo-nodes.
func (a args) nodeOrSpecial(r *request) error {
	if s := a.arg(0); s != "" && s[0] == '@' {
		r.special = s
		return nil
	}
	p, err := a.nodePath(0)
	r.path = p
	return err
}

// parseDomid reads a decimal domain id; domain 0 only where zeroOK.
func parseDomid(s string, zeroOK bool) (uint32, error) {
	id, err := strconv.ParseUint(s, 10, 32)
	if err != nil || id == 0 && !zeroOK {
		return 0, ErrInvalid
	}
	return uint32(id), nil
}

// parseNode serves the operations whose one argument is a node path.
func parseNode(a args) (request, error) {
	if !a.exactly(1) {
		return request{}, ErrInvalid
	}
	p, err := a.nodePath(0)
	return request{path: p}, err
}

// parseWrite splits "path\0value": the value is raw bytes, not a string,
// and may itself hold NULs.
func parseWrite(a args) (request, error) {
	i := bytes.IndexByte(a.raw, 0)
	if i < 0 {
		return request{}, ErrInvalid
	}
	p, err := CanonicalPath(a.domid, string(a.raw[:i]), false)
	return request{path: p, value: a.raw[i+1:]}, err
}

func parseDirectoryPart(a args) (request, error) {
	if !a.exactly(2) {
		return request{}, ErrInvalid
	}
	p, err := a.nodePath(0)
	if err != nil {
		return request{}, err
	}
	off, err := strconv.ParseUint(a.arg(1), 10, 31)
	if err != nil {
		return request{}, ErrInvalid
	}
	return request{path: p, offset: int(off)}, nil
}

func parseGetPerms(a args) (request, error) {
	if !a.exactly(1) {
		return request{}, ErrInvalid
	}
	var r request
	err := a.nodeOrSpecial(&r)
	return r, err
}

func parseSetPerms(a args) (request, error) {
	if !a.atLeast(2) {
		return request{}, ErrInvalid
	}
	r := request{perms: make([]Perm, 0, a.count-1)}
	rest := a.from(1)
	for range a.count - 1 {
		var s string
		s, rest = nextArg(rest)
		pm, err := ParsePerm(s)
		if err != nil {
			return request{}, ErrInvalid
		}
		r.perms = append(r.perms, pm)
	}
	err := a.nodeOrSpecial(&r)
	return r, err
}

// parseWatch serves WATCH and UNWATCH: a path (@ names allowed) and a
// token.
func parseWatch(a args) (request, error) {
	if !a.exactly(2) {
		return request{}, ErrInvalid
	}
	given := a.arg(0)
	p, err := CanonicalPath(a.domid, given, true)
	return request{path: p, asSent: given, token: a.arg(1)}, err
}

func parseTransactionEnd(a args) (request, error) {
	if !a.exactly(1) || (a.joined != "T" && a.joined != "F") {
		return request{}, ErrInvalid
	}
	return request{commit: a.joined == "T"}, nil
}

// parseGetDomainPath reads the number as atoi does, as both Xen daemons
// do: "x" is domain 0.
func parseGetDomainPath(a args) (request, error) {
	if !a.exactly(1) {
		return request{}, ErrInvalid
	}
	return request{domids: []uint32{atoi(a.arg(0))}}, nil
}

// atoi reads leading decimal digits; none gives 0.
func atoi(s string) uint32 {
	var n uint32
	for i := 0; i < len(s) && s[i] >= '0' && s[i] <= '9'; i++ {
		n = n*10 + uint32(s[i]-'0')
	}
	return n
}

func parseIsDomainIntroduced(a args) (request, error) {
	if !a.exactly(1) {
		return request{}, ErrInvalid
	}
	id, err := parseDomid(a.arg(0), true)
	return request{domids: []uint32{id}}, err
}

// parseIntroduce checks all three arguments (domid, ring page frame,
// event channel port) although only the domid is used: the embedded
// daemon maps no ring.
func parseIntroduce(a args) (request, error) {
	if !a.exactly(3) {
		return request{}, ErrInvalid
	}
	id, err := parseDomid(a.arg(0), false)
	if err != nil {
		return request{}, err
	}
	if _, err := strconv.ParseUint(a.arg(1), 10, 64); err != nil {
		return request{}, ErrInvalid
	}
	if _, err := strconv.ParseUint(a.arg(2), 10, 32); err != nil {
		return request{}, ErrInvalid
	}
	return request{domids: []uint32{id}}, nil
}

func parseRelease(a args) (request, error) {
	if !a.exactly(1) {
		return request{}, ErrInvalid
	}
	id, err := parseDomid(a.arg(0), false)
	return request{domids: []uint32{id}}, err
}

// parseDomains reads the arguments of an operation taking exactly n
// domain ids (RESUME 1, SET_TARGET 2); see request.badDomid.
func parseDomains(a args, n int) (request, error) {
	if !a.exactly(n) {
		return request{}, ErrInvalid
	}
	var r request
	rest := a.joined
	for range n {
		var s string
		s, rest = nextArg(rest)
		id, err := parseDomid(s, true)
		if err != nil {
			r.badDomid = true
			break
		}
		r.domids = append(r.domids, id)
	}
	return r, nil
}

func parseControl(a args) (request, error) {
	if !a.atLeast(1) {
		return request{}, ErrInvalid
	}
	r := request{control: a.arg(0)}
	switch r.control {
	case "print":
		if a.count < 2 {
			return request{}, ErrInvalid
		}
		r.text = a.arg(1)
	case "check", "help":
	default:
		return request{}, ErrInvalid
	}
	return r, nil
}
