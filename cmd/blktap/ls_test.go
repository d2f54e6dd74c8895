package main

import (
	"bytes"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestLsShortFits80(t *testing.T) {
	entries := []lsEntry{
		{Name: "web", Domain: 3, Device: "xvda", Format: "qcow2", StateName: "Connected", Phase: "connected",
			Image: "/var/lib/xen/images/a-very-long-directory-name/another-level/web-server-root-disk.qcow2"},
		{Name: "db", Domain: 12, Device: "xvdb", Format: "raw", StateName: "Initialising", Phase: "failed",
			Image: "/srv/db.img", Error: "opening /srv/db.img: no such file or directory"},
		{Name: "scratch", Domain: 3, Device: "xvdc", Format: "ram", StateName: "InitWait", Phase: "waiting-frontend", Image: "scratch"},
	}
	var out bytes.Buffer
	if err := lsShort(&out, entries, 80); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimRight(out.String(), "\n"), "\n")
	if len(lines) != 5 {
		t.Fatalf("want a header, 3 rows and 1 error line:\n%s", out.String())
	}
	for _, l := range lines[:4] {
		if n := utf8.RuneCountInString(l); n > 80 {
			t.Errorf("%d columns: %q", n, l)
		}
	}
	if got := strings.Fields(lines[0]); strings.Join(got, " ") != "NAME DOM VDEV FORMAT STATE IMAGE" {
		t.Errorf("header %q", lines[0])
	}
	if !strings.Contains(lines[1], "…") || !strings.HasSuffix(lines[1], "web-server-root-disk.qcow2") {
		t.Errorf("a long image should keep its file name and lose its middle: %q", lines[1])
	}
	if f := strings.Fields(lines[2]); f[4] != "failed!" {
		t.Errorf("a device with an error should be flagged in STATE: %q", lines[2])
	}
	if f := strings.Fields(lines[3]); f[4] != "waiting-frontend" {
		t.Errorf("a device on its way should show its phase: %q", lines[3])
	}
	if lines[4] != "db (domain 12 xvdb): opening /srv/db.img: no such file or directory" {
		t.Errorf("error line %q", lines[4])
	}
}

func TestElideMiddle(t *testing.T) {
	for _, c := range []struct {
		s    string
		n    int
		want string
	}{
		{"short", 10, "short"},
		{"abcdefghij", 10, "abcdefghij"},
		{"abcdefghijk", 10, "abc…fghijk"},
	} {
		if got := elideMiddle(c.s, c.n); got != c.want || utf8.RuneCountInString(got) > c.n {
			t.Errorf("elideMiddle(%q, %d) = %q, want %q", c.s, c.n, got, c.want)
		}
	}
}

func TestElideMiddleKeepsFileName(t *testing.T) {
	got := elideMiddle("/var/lib/xen/images/deep/dir/web-server-root-disk.qcow2", 34)
	if !strings.HasSuffix(got, "/web-server-root-disk.qcow2") || utf8.RuneCountInString(got) != 34 {
		t.Errorf("%q", got)
	}
}
