package rbd

import (
	"errors"
	"testing"
)

func TestCloneTarget(t *testing.T) {
	parent, err := ParseSpec("rbd/ns/vm1:conf=/etc/ceph/c.conf:id=xen")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ arg, snap, clone string }{
		{"s1", "s1", "rbd/ns/vm1-s1:conf=/etc/ceph/c.conf:id=xen"},
		{"rbd:other/kid", "kid", "other/kid:conf=/etc/ceph/c.conf:id=xen"},
		{"rbd:rbd/ns/kid@monday", "monday", "rbd/ns/kid:conf=/etc/ceph/c.conf:id=xen"},
	} {
		snap, clone, err := CloneTarget(parent, c.arg)
		if err != nil || snap != c.snap || clone.String() != c.clone {
			t.Errorf("CloneTarget(%q) = %q, %q, %v; want %q, %q", c.arg, snap, clone.String(), err, c.snap, c.clone)
		}
	}
	for _, arg := range []string{"", "a/b", "a@b", "a:b", `a\b`, "rbd:rbd/ns/vm1", "rbd:x/y:conf=/other.conf", "rbd:nopool"} {
		if _, _, err := CloneTarget(parent, arg); !errors.Is(err, ErrBadSpec) {
			t.Errorf("CloneTarget(%q): %v, want ErrBadSpec", arg, err)
		}
	}
	snapParent, _ := ParseSpec("rbd/vm1@old")
	if _, _, err := CloneTarget(snapParent, "s1"); !errors.Is(err, ErrBadSpec) {
		t.Errorf("a snapshot's snapshot: %v", err)
	}
}
