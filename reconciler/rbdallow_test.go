package reconciler

import (
	"errors"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/config"
	"github.com/blktap-go/blktap/internal/rbdspec"
)

// Issue 19: rbd: sources only in the pools the YAML's rbd disks use and
// the ones --rbd-allow names, reached with exactly the options allowed.
func TestRBDAllow(t *testing.T) {
	rules, err := ParseRBDAllow([]string{"vms", "tenants/alice", "shared/*", "other:conf=/etc/ceph/b.conf:id=xen"})
	if err != nil {
		t.Fatal(err)
	}
	d := &Daemon{opts: Options{RBDAllow: rules}, desired: map[Key]config.Disk{
		{}: {Format: "rbd", Image: "yamlpool/ns1/disk0:id=tap"},
	}}
	for _, c := range []struct {
		src  string
		want bool
	}{
		{"vms/a", true},
		{"vms/a:rados_osd_op_timeout=5", true}, // the timeout reaches no other cluster
		{"vms/ns/a", false},
		{"vms/a:conf=/etc/ceph/b.conf", false},
		{"vms/a:id=admin", false}, // the default, but not as written
		{"tenants/alice/a", true},
		{"tenants/a", false},
		{"tenants/bob/a", false},
		{"shared/a", true}, // "*": the whole pool, default namespace included
		{"shared/x/a", true},
		{"other/a:conf=/etc/ceph/b.conf:id=xen", true},
		{"other/a:conf=/etc/ceph/b.conf", false},
		{"other/a:conf=/etc/ceph/b.conf:id=xen:keyring=/tmp/k", false},
		{"yamlpool/ns1/b:id=tap", true},
		{"yamlpool/ns1/b", false},
		{"yamlpool/b:id=tap", false},
		{"rbd/a", false},
	} {
		err := d.checkRBDSource(c.src)
		if (err == nil) != c.want || err != nil && !errors.Is(err, ErrNotAllowed) {
			t.Errorf("%s: %v, want allowed=%v", c.src, err, c.want)
		}
	}
	err = d.checkRBDSource("rbd/a:conf=/c:rados_osd_op_timeout=9")
	if err == nil || !strings.Contains(err.Error(), "pool rbd:conf=/c:") || strings.Contains(err.Error(), "timeout") {
		t.Errorf("the refusal should name the pool and options: %v", err)
	}
	for _, bad := range []string{"", "a/b/c", ":conf=/x", "a:bogus=1", "a@s"} {
		if _, err := ParseRBDAllow([]string{bad}); err == nil {
			t.Errorf("--rbd-allow %q accepted", bad)
		}
	}
	if _, err := rbdspec.Parse("shared/*/a"); err != nil {
		t.Fatalf("'*' as a namespace: %v", err)
	}
}
