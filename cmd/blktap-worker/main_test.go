package main

import (
	"os/exec"
	"strings"
	"testing"
)

func TestParseArgs(t *testing.T) {
	for _, c := range []struct {
		args  []string
		name  string
		adopt bool
		bad   bool
	}{
		{args: []string{"__worker", "--name", "d1", "--adopt"}, name: "d1", adopt: true},
		{args: []string{"--name=d2"}, name: "d2"},
		{args: []string{"__worker", "--adopt"}, bad: true},
		{args: []string{"--name"}, bad: true},
		{args: []string{"--name", "d", "--verbose"}, bad: true},
		{args: nil, bad: true},
	} {
		name, adopt, err := parseArgs(c.args)
		if (err != nil) != c.bad || name != c.name && !c.bad || adopt != c.adopt && !c.bad {
			t.Errorf("%q: %q %v %v, want %q %v bad=%v", c.args, name, adopt, err, c.name, c.adopt, c.bad)
		}
	}
}

// The worker binary exists to leave out what every idle worker would
// otherwise pay for (docs/PERFORMANCE.md, "A worker binary of its own"):
// its imports must not grow the command tree, metrics, YAML, the
// reconciler or xenstore back.
func TestLeanImports(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, banned := range []string{"github.com/spf13/", "github.com/prometheus/", "gopkg.in/yaml", "google.golang.org/protobuf",
			"github.com/blktap-go/blktap/reconciler", "github.com/blktap-go/blktap/xenstore", "github.com/blktap-go/blktap/config", "net/http"} {
			if strings.HasPrefix(dep, banned) {
				t.Errorf("blktap-worker links %s", dep)
			}
		}
	}
}
