package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The test binary doubles as this systemctl (XT_SYSTEMCTL_MAIN=1, which
// start's re-exec of itself as "__supervise" inherits) and as a
// Type=notify service (XT_FAKE_SERVICE=1, set by the unit's ExecStart).
func TestMain(m *testing.M) {
	switch {
	case os.Getenv("XT_FAKE_SERVICE") == "1":
		fakeService()
	case os.Getenv("XT_SYSTEMCTL_MAIN") == "1":
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// fakeService says READY=1 and waits for SIGTERM, like blktap run.
func fakeService() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)
	c, err := net.Dial("unixgram", os.Getenv("NOTIFY_SOCKET"))
	if err != nil {
		os.Exit(7)
	}
	c.Write([]byte("STATUS=up\nREADY=1\n"))
	<-sigs
	os.Exit(0)
}

type sandbox struct {
	t    *testing.T
	root string
	self string
}

func newSandbox(t *testing.T, unit string) *sandbox {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	s := &sandbox{t: t, root: t.TempDir(), self: self}
	for _, d := range []string{"/etc/systemd/system", "/var/log"} {
		os.MkdirAll(s.root+d, 0o755)
	}
	unit = strings.ReplaceAll(unit, "SELF", self)
	unit = strings.ReplaceAll(unit, "ROOT", s.root)
	os.WriteFile(s.root+"/etc/systemd/system/xt.service", []byte(unit), 0o644)
	t.Cleanup(func() {
		if pid := readInt(filepath.Join(s.root, "run/xt-systemd/xt.service.supervisor")); pid > 0 {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		if pid := readInt(filepath.Join(s.root, "run/xt-systemd/xt.service.pid")); pid > 0 {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	return s
}

// systemctl runs this binary as systemctl in the sandbox; it returns the
// output and the exit code.
func (s *sandbox) systemctl(args ...string) (string, int) {
	c := exec.Command(s.self, args...)
	c.Env = append(os.Environ(), "XT_SYSTEMCTL_MAIN=1", "XT_SYSTEMD_ROOT="+s.root)
	out, err := c.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok {
		return string(out), ee.ExitCode()
	} else if err != nil {
		s.t.Fatal(err)
	}
	return string(out), 0
}

func (s *sandbox) mainPID() int {
	out, _ := s.systemctl("show", "-p", "MainPID", "xt")
	n, _ := strconv.Atoi(strings.TrimPrefix(strings.TrimSpace(out), "MainPID="))
	return n
}

// waitFor polls until cond holds; the bound is generous because the
// machine may be loaded, and a miss still fails.
func (s *sandbox) waitFor(what string, cond func() bool) {
	s.t.Helper()
	for dl := time.Now().Add(30 * time.Second); time.Now().Before(dl); time.Sleep(50 * time.Millisecond) {
		if cond() {
			return
		}
	}
	s.t.Fatalf("timed out waiting for %s; log:\n%s", what, s.log())
}

func (s *sandbox) log() string {
	b, _ := os.ReadFile(s.root + "/var/log/xt.log")
	return string(b)
}

// A Type=notify unit through start, a crash and its restart, and stop
// with ExecStop and SIGTERM: the paths blktap.service takes in the harness.
func TestNotifyUnitLifecycle(t *testing.T) {
	s := newSandbox(t, `[Service]
Type=notify
ExecStart=/usr/bin/env XT_FAKE_SERVICE=1 SELF
ExecStop=/bin/sh -c 'echo $MAINPID > ROOT/stopped'
Restart=on-failure
RestartSec=100ms
KillMode=process
TimeoutStopSec=20
`)
	if out, code := s.systemctl("start", "xt"); code != 0 {
		t.Fatalf("start: exit %d: %s\n%s", code, out, s.log())
	}
	if out, code := s.systemctl("is-active", "xt"); code != 0 || strings.TrimSpace(out) != "active" {
		t.Fatalf("is-active after start: %q exit %d", out, code)
	}
	first := s.mainPID()
	if first <= 0 || !alive(first) {
		t.Fatalf("MainPID %d is not a live process", first)
	}
	if !strings.Contains(s.log(), "READY=1 after") {
		t.Errorf("the supervisor did not log READY=1:\n%s", s.log())
	}

	syscall.Kill(first, syscall.SIGKILL) // a failure: Restart=on-failure applies
	s.waitFor("a restarted main process", func() bool {
		p := s.mainPID()
		out, _ := s.systemctl("is-active", "xt")
		return p > 0 && p != first && alive(p) && strings.TrimSpace(out) == "active"
	})
	second := s.mainPID()

	if out, code := s.systemctl("stop", "xt"); code != 0 {
		t.Fatalf("stop: exit %d: %s", code, out)
	}
	if b, err := os.ReadFile(s.root + "/stopped"); err != nil || strings.TrimSpace(string(b)) != strconv.Itoa(second) {
		t.Errorf("ExecStop saw $MAINPID %q (%v), want %d", b, err, second)
	}
	if alive(second) {
		t.Errorf("main process %d outlived stop", second)
	}
	if out, code := s.systemctl("is-active", "xt"); code != 3 || strings.TrimSpace(out) != "inactive" {
		t.Errorf("is-active after stop: %q exit %d, want inactive, 3", out, code)
	}
}

// A main process that exits with a status under Restart=no leaves the unit
// failed, and start reports the failed job.
func TestFailedUnit(t *testing.T) {
	s := newSandbox(t, `[Service]
Type=notify
ExecStart=/bin/sh -c 'exit 4'
Restart=no
KillMode=process
`)
	out, code := s.systemctl("start", "xt")
	if code == 0 || !strings.Contains(out, "failed") {
		t.Fatalf("start of a failing unit: exit %d: %s", code, out)
	}
	s.waitFor("state failed", func() bool {
		out, _ := s.systemctl("is-active", "xt")
		return strings.TrimSpace(out) == "failed"
	})
	if !strings.Contains(s.log(), "exited: status=4") {
		t.Errorf("log does not say status=4:\n%s", s.log())
	}
	if out, _ := s.systemctl("status", "xt"); !strings.Contains(out, fmt.Sprintf("Active: %s", "failed")) {
		t.Errorf("status: %s", out)
	}
}
