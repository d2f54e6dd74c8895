package main

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

func TestSplit(t *testing.T) {
	got, err := split(`/bin/sh -c 'if [ "$(systemctl is-system-running)" = stopping ]; then exec x; fi'`)
	want := []string{"/bin/sh", "-c", `if [ "$(systemctl is-system-running)" = stopping ]; then exec x; fi`}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("split: %q, %v; want %q", got, err, want)
	}
	if _, err := split(`/bin/echo 'open`); err == nil {
		t.Error("an unterminated quote was accepted")
	}
	argv, ignore := expand([]string{"-/bin/kill", "-HUP", "$MAINPID"}, 42)
	if !ignore || !reflect.DeepEqual(argv, []string{"/bin/kill", "-HUP", "42"}) {
		t.Errorf("expand: %q ignore=%v", argv, ignore)
	}
}

// The shipped unit and a drop-in that resets ExecStart, merged in order.
func TestParseUnitAndDropIn(t *testing.T) {
	u := &unit{name: "blktap.service"}
	if err := parse(u, "../../../packaging/systemd/blktap.service"); err != nil {
		t.Fatal(err)
	}
	if u.typ != "notify" || u.killMode != "process" || u.restart != "on-failure" ||
		u.restartSec != 2*time.Second || u.tStop != 5*time.Minute || len(u.execStop) != 1 || len(u.execStart) != 1 {
		t.Fatalf("unit read as %+v", u)
	}
	drop := filepath.Join(t.TempDir(), "xt.conf")
	os.WriteFile(drop, []byte("[Service]\nExecStart=\nExecStart=/usr/sbin/blktap run \\\n  --serve-vbd\n"), 0o644)
	if err := parse(u, drop); err != nil {
		t.Fatal(err)
	}
	if want := [][]string{{"/usr/sbin/blktap", "run", "--serve-vbd"}}; !reflect.DeepEqual(u.execStart, want) {
		t.Errorf("ExecStart after the drop-in: %q, want %q", u.execStart, want)
	}
}
