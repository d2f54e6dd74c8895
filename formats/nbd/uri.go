package nbd

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"

	"github.com/blktap-go/blktap/internal/nbdwire"
)

// ErrBadURI: an NBD URI that ParseURI refuses.
var ErrBadURI = errors.New("bad NBD URI")

// DefaultPort is the NBD port IANA assigned; nbd://HOST/ uses it.
const DefaultPort = 10809

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
	u, why := parseURI(s)
	if why != "" {
		return URI{}, fmt.Errorf("%w %q: %s (write nbd+unix:///EXPORT?socket=PATH or nbd://HOST:PORT/EXPORT)",
			ErrBadURI, s, why)
	}
	return u, nil
}

// parseURI is ParseURI; it says why it refuses s, or "".
func parseURI(s string) (URI, string) {
	raw := s
	if strings.HasPrefix(raw, "nbd:nbd") {
		raw = raw[len("nbd:"):]
	}
	if strings.ContainsAny(raw, "\x00\n\r\t ") {
		return URI{}, "contains NUL, whitespace or a control character"
	}
	u, err := url.Parse(raw)
	if err != nil {
		return URI{}, err.Error()
	}
	var out URI
	if out.Network, err = uriNetwork(u.Scheme); err != nil {
		return URI{}, err.Error()
	}
	switch {
	case u.Opaque != "":
		return URI{}, "missing // after the scheme"
	case u.User != nil:
		return URI{}, "user info is not allowed"
	case u.Fragment != "" || u.RawFragment != "" || strings.Contains(raw, "#"):
		return URI{}, "fragments are not allowed"
	case u.Path == "", u.Path == "/":
	case strings.HasPrefix(u.Path, "/"):
		out.Export = u.Path[1:]
	default:
		return URI{}, "the export must follow a /"
	}
	if len(out.Export) > nbdwire.MaxStringLen {
		return URI{}, fmt.Sprintf("export name of %d bytes; at most %d", len(out.Export), nbdwire.MaxStringLen)
	}
	q, err := url.ParseQuery(u.RawQuery)
	if err != nil {
		return URI{}, fmt.Sprintf("query: %v", err)
	}
	if why := checkQuery(q, out.Network); why != "" {
		return URI{}, why
	}
	if out.Network == "unix" {
		if u.Host != "" {
			return URI{}, "nbd+unix URIs have no host: write three slashes, nbd+unix:///EXPORT?socket=PATH"
		}
		if out.Address = q.Get("socket"); out.Address == "" {
			return URI{}, "nbd+unix needs ?socket=PATH"
		}
		return out, ""
	}
	out.Address, err = tcpAddress(u)
	if err != nil {
		return URI{}, err.Error()
	}
	return out, ""
}

// uriNetwork maps a URI scheme to the network it dials.
func uriNetwork(scheme string) (string, error) {
	switch scheme {
	case "nbd", "nbd+tcp":
		return "tcp", nil
	case "nbd+unix":
		return "unix", nil
	case "nbds", "nbds+tcp", "nbds+unix":
		return "", errors.New("TLS is not supported; use a unix socket or a trusted network")
	case "nbd+vsock", "nbds+vsock":
		return "", errors.New("vsock is not supported")
	case "":
		return "", errors.New("no scheme")
	}
	return "", fmt.Errorf("unknown scheme %q", scheme)
}

// checkQuery allows socket= once on a unix URI and nothing else.
func checkQuery(q url.Values, network string) string {
	for k, v := range q {
		switch {
		case k == "socket" && network != "unix":
			return "socket= belongs to nbd+unix URIs"
		case k != "socket":
			return fmt.Sprintf("unknown query parameter %q", k)
		case len(v) != 1 || v[0] == "":
			return "give socket= exactly once, non-empty"
		}
	}
	return ""
}

// tcpAddress is a TCP URI's host:port, the port defaulting to 10809.
func tcpAddress(u *url.URL) (string, error) {
	host, port := u.Hostname(), u.Port()
	switch {
	case host == "":
		return "", errors.New("no host")
	case strings.Contains(host, ":") && !strings.HasPrefix(u.Host, "["):
		return "", errors.New("an IPv6 address needs brackets: nbd://[::1]:10809/")
	case strings.HasSuffix(u.Host, ":"):
		return "", errors.New("empty port")
	}
	p := DefaultPort
	if port != "" {
		n, err := strconv.Atoi(port)
		if err != nil || n < 1 || n > 65535 {
			return "", fmt.Errorf("port %q is not 1..65535", port)
		}
		p = n
	}
	return net.JoinHostPort(host, strconv.Itoa(p)), nil
}
