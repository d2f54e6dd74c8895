package main

import (
	"errors"
	"strings"
	"testing"
)

// Issue 16 item 5: bad --ram-max and --nbd-allow values are usage errors
// naming the flag, found before anything starts.
func TestRunLimitFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--ram-max", "0"}, "--ram-max"},
		{[]string{"--ram-max", "lots"}, "--ram-max"},
		{[]string{"--nbd-allow", "relative/dir"}, "--nbd-allow"},
		{[]string{"--nbd-allow", "/run/nbd,host:0"}, "--nbd-allow \"host:0\""},
		{[]string{"--nbd-allow", "/run/nbd,"}, "--nbd-allow: an empty entry"},
		{[]string{"--rbd-allow", "a/b/c"}, "--rbd-allow \"a/b/c\""},
		{[]string{"--rbd-allow", "rbd:bogus=1"}, "--rbd-allow"},
	} {
		err := execute(append(append([]string{"run"}, c.args...), "-c", "", "--state-dir", t.TempDir()))
		var ue *usageError
		if !errors.As(err, &ue) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: %v; want a usage error with %q", c.args, err, c.want)
		}
	}
}
