// Package rbdspec reads and writes the names of Ceph RBD images in the form
// qemu's rbd driver takes. It is the rbd format's naming alone, with no
// cgo and nothing of the project imported, so the YAML parser and the
// daemon check a name without linking librbd.
package rbdspec

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// ErrBadSpec: an image name that Parse refuses.
var ErrBadSpec = errors.New("bad rbd image name")

// Spec names one RBD image (or one of its snapshots) and how to reach the
// cluster that holds it.
type Spec struct {
	Pool      string
	Namespace string // "" is the pool's default namespace
	Image     string
	Snap      string // "" is the image's head, which may be written

	Conf    string // ceph.conf path; "" is librados' default search
	ID      string // client id without "client."; "" is "admin"
	Keyring string // keyring path; "" is what the conf file says
	MonHost string // monitor addresses, overriding the conf file's
	// OpTimeout is rados_osd_op_timeout in seconds: how long a request
	// waits for an OSD that does not answer before it fails. "" is the
	// format's default (see formats/rbd).
	OpTimeout string
}

// specKeys are the options a Spec carries, in the order String writes
// them.
var specKeys = []string{"conf", "id", "keyring", "mon_host", "rados_osd_op_timeout"}

func (s *Spec) option(key string) *string {
	switch key {
	case "conf":
		return &s.Conf
	case "id":
		return &s.ID
	case "keyring":
		return &s.Keyring
	case "mon_host":
		return &s.MonHost
	case "rados_osd_op_timeout":
		return &s.OpTimeout
	}
	return nil
}

// Parse reads an image name in the form qemu's rbd driver takes after
// its "rbd:" prefix, so one string names an image to both programs:
//
//	POOL[/NAMESPACE]/IMAGE[@SNAP][:KEY=VALUE...]
//
// KEY is conf, id, keyring, mon_host or rados_osd_op_timeout (seconds, a
// whole number from 1). A backslash makes the next
// character literal (qemu's escape for ':', '@', '/' and '=' in names).
// The "rbd:" prefix of params is accepted too. Names are checked the way
// the cluster would refuse them, so a typo fails here, at once, and not
// after a connection timeout.
func Parse(in string) (Spec, error) {
	bad := func(why string, args ...any) (Spec, error) {
		return Spec{}, fmt.Errorf("%w %q: %s (write POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=PATH][:id=USER][:keyring=PATH])",
			ErrBadSpec, in, fmt.Sprintf(why, args...))
	}
	s := strings.TrimPrefix(in, "rbd:")
	if strings.ContainsAny(s, "\x00\n\r\t") {
		return bad("contains NUL or a control character")
	}
	fields, err := splitUnescaped(s, ':')
	if err != nil {
		return bad("%v", err)
	}
	var spec Spec
	if err := spec.parseName(fields[0]); err != nil {
		return bad("%v", err)
	}
	seen := map[string]bool{}
	for _, f := range fields[1:] {
		kv, err := splitUnescaped(f, '=')
		if err != nil {
			return bad("%v", err)
		}
		if len(kv) != 2 {
			return bad("option %q is not KEY=VALUE", unescape(f))
		}
		key, value := unescape(kv[0]), unescape(kv[1])
		p := spec.option(key)
		if p == nil {
			return bad("unknown option %q (valid: %s)", key, strings.Join(specKeys, ", "))
		}
		if seen[key] {
			return bad("option %q given twice", key)
		}
		if value == "" {
			return bad("option %q is empty", key)
		}
		if key == "rados_osd_op_timeout" {
			if n, err := strconv.Atoi(value); err != nil || n < 1 || n > 86400 {
				return bad("rados_osd_op_timeout %q: want whole seconds from 1 to 86400", value)
			}
		}
		seen[key] = true
		*p = value
	}
	return spec, nil
}

// parseName reads POOL[/NAMESPACE]/IMAGE[@SNAP], still escaped.
func (s *Spec) parseName(name string) error {
	at, err := splitUnescaped(name, '@')
	if err != nil {
		return err
	}
	switch len(at) {
	case 1:
	case 2:
		if s.Snap = unescape(at[1]); s.Snap == "" {
			return errors.New("empty snapshot name after '@'")
		}
	default:
		return errors.New("more than one '@'")
	}
	parts, err := splitUnescaped(at[0], '/')
	if err != nil {
		return err
	}
	switch len(parts) {
	case 2:
		s.Pool, s.Image = unescape(parts[0]), unescape(parts[1])
	case 3:
		s.Pool, s.Namespace, s.Image = unescape(parts[0]), unescape(parts[1]), unescape(parts[2])
		if s.Namespace == "" {
			return errors.New("empty namespace")
		}
	default:
		return errors.New("want POOL/IMAGE or POOL/NAMESPACE/IMAGE")
	}
	if s.Pool == "" || s.Image == "" {
		return errors.New("empty pool or image name")
	}
	// librbd keeps image names in omap keys and object names; qemu and
	// the rbd tool refuse longer ones too.
	if len(s.Image) > 250 || len(s.Pool) > 250 || len(s.Namespace) > 250 || len(s.Snap) > 250 {
		return errors.New("a name is longer than 250 bytes")
	}
	return nil
}

// String writes the spec back in the form Parse reads (without the
// "rbd:" prefix), options in a fixed order.
func (s Spec) String() string {
	var b strings.Builder
	b.WriteString(escape(s.Pool, nameSpecials))
	if s.Namespace != "" {
		b.WriteString("/" + escape(s.Namespace, nameSpecials))
	}
	b.WriteString("/" + escape(s.Image, nameSpecials))
	if s.Snap != "" {
		b.WriteString("@" + escape(s.Snap, nameSpecials))
	}
	for _, k := range specKeys {
		if v := *s.option(k); v != "" {
			b.WriteString(":" + k + "=" + escape(v, valueSpecials))
		}
	}
	return b.String()
}

// Name is the image's name without options: what messages and `ls` show.
func (s Spec) Name() string {
	t := s
	t.Conf, t.ID, t.Keyring, t.MonHost, t.OpTimeout = "", "", "", "", ""
	return t.String()
}

// WithoutSnap is the spec of the image's head.
func (s Spec) WithoutSnap() Spec { s.Snap = ""; return s }

// splitUnescaped splits s at every sep that no backslash escapes, keeping
// the escapes in the pieces.
func splitUnescaped(s string, sep byte) ([]string, error) {
	var out []string
	start := 0
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '\\':
			if i+1 == len(s) {
				return nil, errors.New("a trailing backslash escapes nothing")
			}
			i++
		case sep:
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	return append(out, s[start:]), nil
}

func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			i++
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// nameSpecials and valueSpecials are what escape backslashes in names
// and in option values: the separators Parse splits them at.
const (
	nameSpecials  = `\:@/`
	valueSpecials = `\:=`
)

func escape(s, specials string) string {
	if !strings.ContainsAny(s, specials) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if strings.IndexByte(specials, s[i]) >= 0 {
			b.WriteByte('\\')
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
