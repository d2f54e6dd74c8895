package nbd

import (
	"errors"
	"testing"
)

func TestParseURI(t *testing.T) {
	good := []struct {
		in   string
		want URI
	}{
		{"nbd+unix:///?socket=/run/a.sock", URI{"unix", "/run/a.sock", ""}},
		{"nbd+unix:///disk1?socket=/run/a.sock", URI{"unix", "/run/a.sock", "disk1"}},
		{"nbd:nbd+unix:///disk1?socket=/run/a.sock", URI{"unix", "/run/a.sock", "disk1"}},
		{"nbd+unix:///a%20b%2Fc?socket=rel%20path.sock", URI{"unix", "rel path.sock", "a b/c"}},
		{"nbd://127.0.0.1:10810/exp", URI{"tcp", "127.0.0.1:10810", "exp"}},
		{"nbd:nbd://localhost/", URI{"tcp", "localhost:10809", ""}},
		{"nbd://localhost", URI{"tcp", "localhost:10809", ""}},
		{"nbd+tcp://[::1]:99/x/y", URI{"tcp", "[::1]:99", "x/y"}},
	}
	for _, c := range good {
		got, err := ParseURI(c.in)
		if err != nil || got != c.want {
			t.Errorf("ParseURI(%q) = %+v, %v; want %+v", c.in, got, err, c.want)
			continue
		}
		if back, err := ParseURI(got.String()); err != nil || back != got {
			t.Errorf("round trip of %q via %q: %+v %v", c.in, got.String(), back, err)
		}
	}
	for _, in := range []string{
		"", "nbd", "nbd:", "nbd:x", "/dev/nbd0", "http://h/", "nbds://h/", "nbds+unix:///?socket=/s",
		"nbd+vsock://1:2/", "nbd+unix:///", "nbd+unix:///?socket=", "nbd+unix://host/?socket=/s",
		"nbd+unix:///?socket=/a&socket=/b", "nbd+unix:///?socket=/s&tls=on", "nbd://h/?socket=/s",
		"nbd://user@h/", "nbd://h/#frag", "nbd://h:0/", "nbd://h:70000/", "nbd://h:x/", "nbd://h:/",
		"nbd:///e", "nbd://h/e\x00", "nbd://h/e x", "nbd+unix:///%zz?socket=/s",
	} {
		if u, err := ParseURI(in); !errors.Is(err, ErrBadURI) {
			t.Errorf("ParseURI(%q) = %+v, %v; want ErrBadURI", in, u, err)
		}
	}
}
