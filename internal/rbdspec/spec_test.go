package rbdspec

import (
	"errors"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	good := []struct {
		in   string
		want Spec
	}{
		{"rbd/disk", Spec{Pool: "rbd", Image: "disk"}},
		{"rbd:rbd/disk", Spec{Pool: "rbd", Image: "disk"}},
		{"pool/ns/disk@snap1", Spec{Pool: "pool", Namespace: "ns", Image: "disk", Snap: "snap1"}},
		{"p/d:conf=/etc/ceph/x.conf:id=xen:keyring=/k", Spec{Pool: "p", Image: "d", Conf: "/etc/ceph/x.conf", ID: "xen", Keyring: "/k"}},
		{`p/a\:b\@c:mon_host=10.0.0.1\:6789`, Spec{Pool: "p", Image: "a:b@c", MonHost: "10.0.0.1:6789"}},
		{"p/d:rados_osd_op_timeout=30", Spec{Pool: "p", Image: "d", OpTimeout: "30"}},
	}
	for _, c := range good {
		got, err := Parse(c.in)
		if err != nil {
			t.Errorf("Parse(%q): %v", c.in, err)
			continue
		}
		if got != c.want {
			t.Errorf("Parse(%q) = %+v, want %+v", c.in, got, c.want)
		}
		again, err := Parse(got.String())
		if err != nil || again != got {
			t.Errorf("round trip of %q through %q: %+v, %v", c.in, got.String(), again, err)
		}
	}
	bad := map[string]string{
		"":                              "want POOL/IMAGE",
		"disk":                          "want POOL/IMAGE",
		"a/b/c/d":                       "want POOL/IMAGE",
		"/disk":                         "empty pool or image",
		"p/d@":                          "empty snapshot",
		"p/d@a@b":                       "more than one '@'",
		"p/d:foo=1":                     `unknown option "foo" (valid: conf, id, keyring, mon_host, rados_osd_op_timeout)`,
		"p/d:conf":                      "is not KEY=VALUE",
		"p/d:rados_osd_op_timeout=0":    "whole seconds",
		"p/d:rados_osd_op_timeout=x":    "whole seconds",
		"p/d:id=a:id=b":                 "given twice",
		"p/d:id=":                       "is empty",
		`p/d\`:                          "trailing backslash",
		"p/d\n":                         "control character",
		"p/" + strings.Repeat("x", 251): "longer than 250",
	}
	for in, want := range bad {
		_, err := Parse(in)
		if err == nil || !errors.Is(err, ErrBadSpec) || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%q) = %v, want an ErrBadSpec saying %q", in, err, want)
		}
	}
}

func TestSpecName(t *testing.T) {
	s, err := Parse("p/ns/d@s:conf=/c:id=u")
	if err != nil {
		t.Fatal(err)
	}
	if got := s.Name(); got != "p/ns/d@s" {
		t.Errorf("Name = %q", got)
	}
	if got := s.WithoutSnap().String(); got != "p/ns/d:conf=/c:id=u" {
		t.Errorf("WithoutSnap = %q", got)
	}
}

// FuzzParse: no input panics, and what parses writes back to a
// string that parses to the same spec.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"rbd/disk", "p/ns/d@s:conf=/c:id=u:keyring=/k", `p/a\:b:mon_host=h\:1`, "rbd:x/y", "p/d:=:"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		s, err := Parse(in)
		if err != nil {
			return
		}
		again, err := Parse(s.String())
		if err != nil || again != s {
			t.Fatalf("%q parsed to %+v, wrote %q, which parses to %+v, %v", in, s, s.String(), again, err)
		}
	})
}
