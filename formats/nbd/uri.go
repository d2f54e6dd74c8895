package nbd

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
)

// ErrBadURI: an NBD URI that ParseURI refuses.
var ErrBadURI = errors.New("bad NBD URI")

// DefaultPort is the NBD port IANA assigned; nbd://HOST/ uses it.
const DefaultPort = 10809

// maxExportName is the longest export name the protocol allows (bytes).
const maxExportName = 4096

// URI is a parsed NBD URI: where to connect and which export to ask for.
type URI struct {
	Network string // "unix" or "tcp"
	Address string // the socket path, or host:port
	Export  string // the export name; "" is the server's default export
}

// String writes the URI back in the form ParseURI reads.
func (u URI) String() string {
	path := "/" + url.PathEscape(u.Export)
	if u.Network == "unix" {
		return "nbd+unix://" + path + "?socket=" + url.QueryEscape(u.Address)
	}
	return "nbd://" + u.Address + path
}

// ParseURI reads an NBD URI in the forms qemu and libnbd use:
//
//	nbd+unix:///EXPORT?socket=PATH    a unix socket (EXPORT may be empty)
//	nbd://HOST[:PORT]/EXPORT          TCP; PORT defaults to 10809
//	nbd+tcp://HOST[:PORT]/EXPORT      the same
//	[HOST] is a name, an IPv4 address or a bracketed IPv6 address
//
// The params form "nbd:nbd+unix:///..." (a format prefix) is accepted too.
// The export name is percent-decoded. It is strict: TLS schemes (nbds,
// nbds+unix), vsock, user info, fragments, unknown query keys, a host on
// a unix URI and a socket on a TCP URI are errors that say what to write.
func ParseURI(s string) (URI, error) {
	bad := func(why string, args ...any) (URI, error) {
		return URI{}, fmt.Errorf("%w %q: %s (write nbd+unix:///EXPORT?socket=PATH or nbd://HOST:PORT/EXPORT)",
			ErrBadURI, s, fmt.Sprintf(why, args...))
	}
	raw := s
	if strings.HasPrefix(raw, "nbd:nbd") {
		raw = raw[len("nbd:"):]
	}
	if strings.ContainsAny(raw, "\x00\n\r\t ") {
		return bad("contains NUL, whitespace or a control character")
	}
	u, err := url.Parse(raw)
	if err != nil {
		return bad("%v", err)
	}
	var out URI
	switch u.Scheme {
	case "nbd", "nbd+tcp":
		out.Network = "tcp"
	case "nbd+unix":
		out.Network = "unix"
	case "nbds", "nbds+tcp", "nbds+unix":
		return bad("TLS is not supported; use a unix socket or a trusted network")
	case "nbd+vsock", "nbds+vsock":
		return bad("vsock is not supported")
	case "":
		return bad("no scheme")
	default:
		return bad("unknown scheme %q", u.Scheme)
	}
	if u.Opaque != "" {
		return bad("missing // after the scheme")
	}
	if u.User != nil {
		return bad("user info is not allowed")
	}
	if u.Fragment != "" || u.RawFragment != "" || strings.Contains(raw, "#") {
		return bad("fragments are not allowed")
	}
	switch {
	case u.Path == "", u.Path == "/":
	case strings.HasPrefix(u.Path, "/"):
		out.Export = u.Path[1:]
	default:
		return bad("the export must follow a /")
	}
	if len(out.Export) > maxExportName {
		return bad("export name of %d bytes; at most %d", len(out.Export), maxExportName)
	}
	q, err := url.ParseQuery(u.RawQuery)
	if err != nil {
		return bad("query: %v", err)
	}
	for k, v := range q {
		if k != "socket" || out.Network != "unix" {
			if k == "socket" {
				return bad("socket= belongs to nbd+unix URIs")
			}
			return bad("unknown query parameter %q", k)
		}
		if len(v) != 1 || v[0] == "" {
			return bad("give socket= exactly once, non-empty")
		}
	}
	if out.Network == "unix" {
		if u.Host != "" {
			return bad("nbd+unix URIs have no host: write three slashes, nbd+unix:///EXPORT?socket=PATH")
		}
		out.Address = q.Get("socket")
		if out.Address == "" {
			return bad("nbd+unix needs ?socket=PATH")
		}
		return out, nil
	}
	host, port := u.Hostname(), u.Port()
	if host == "" {
		return bad("no host")
	}
	if strings.Contains(host, ":") && !strings.HasPrefix(u.Host, "[") {
		return bad("an IPv6 address needs brackets: nbd://[::1]:10809/")
	}
	if strings.HasSuffix(u.Host, ":") {
		return bad("empty port")
	}
	p := DefaultPort
	if port != "" {
		n, err := strconv.Atoi(port)
		if err != nil || n < 1 || n > 65535 {
			return bad("port %q is not 1..65535", port)
		}
		p = n
	}
	out.Address = net.JoinHostPort(host, strconv.Itoa(p))
	return out, nil
}
