package main

import (
	"os"
	"os/exec"
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

func TestParseArgs(t *testing.T) {
	for _, c := range []struct {
		args      []string
		cmd, name string
	}{
		{nil, "", ""},
		{[]string{"--no-block", "-q"}, "", ""},
		{[]string{"start", "blktap"}, "start", "blktap.service"},
		{[]string{"--quiet", "is-active", "-q", "blktap.service"}, "is-active", "blktap.service"},
		{[]string{"show", "-p", "MainPID", "blktap"}, "show", "blktap.service"},
		{[]string{"show", "--property=MainPID", "xen.socket"}, "show", "xen.socket"},
		{[]string{"daemon-reload"}, "daemon-reload", ""},
	} {
		cmd, name, _ := parseArgs(c.args)
		if cmd != c.cmd || name != c.name {
			t.Errorf("parseArgs(%q) = %q, %q; want %q, %q", c.args, cmd, name, c.cmd, c.name)
		}
	}
}

func TestNotifiesReady(t *testing.T) {
	for msg, want := range map[string]bool{
		"READY=1": true, "STATUS=up\nREADY=1\n": true, "READY=0": false,
		"STATUS=READY=1": false, "": false, "MAINPID=4\nREADY=10": false,
	} {
		if got := notifiesReady([]byte(msg)); got != want {
			t.Errorf("notifiesReady(%q) = %v", msg, got)
		}
	}
}

// exitOutcome against real exit statuses: an exit code is a failure, a
// SIGTERM is clean (as systemd counts it), a SIGKILL is not.
func TestExitOutcome(t *testing.T) {
	exit1 := exec.Command("/bin/sh", "-c", "exit 1").Run()
	term := exec.Command("/bin/sh", "-c", "kill -TERM $$").Run()
	kill := exec.Command("/bin/sh", "-c", "kill -KILL $$").Run()
	if exit1 == nil || term == nil || kill == nil {
		t.Fatalf("the shell did not fail as asked: %v %v %v", exit1, term, kill)
	}
	for _, c := range []struct {
		restart  string
		err      error
		stopping bool
		again    bool
		final    string
	}{
		{"on-failure", exit1, false, true, ""},
		{"on-failure", kill, false, true, ""},
		{"on-failure", term, false, false, "inactive"},
		{"on-failure", nil, false, false, "inactive"},
		{"on-failure", exit1, true, false, "inactive"},
		{"always", nil, false, true, ""},
		{"always", term, true, false, "inactive"},
		{"no", exit1, false, false, "failed"},
		{"no", kill, false, false, "failed"},
		{"no", term, false, false, "inactive"},
	} {
		again, final := exitOutcome(c.restart, c.err, c.stopping)
		if again != c.again || final != c.final {
			t.Errorf("exitOutcome(%s, %v, stopping=%v) = %v, %q; want %v, %q",
				c.restart, describe(c.err), c.stopping, again, final, c.again, c.final)
		}
	}
}
