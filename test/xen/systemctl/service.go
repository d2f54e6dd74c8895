package main

// The jobs one invocation runs: start, stop, daemon-reload, ExecStop
// and ExecReload commands.

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func run(w []string, pid int) error {
	argv, ignore := expand(w, pid)
	c := exec.Command(argv[0], argv[1:]...)
	c.Env = append(os.Environ(), "MAINPID="+strconv.Itoa(pid))
	c.Stdout, c.Stderr = output(), output()
	if err := c.Run(); err != nil && !ignore {
		return err
	}
	return nil
}

// logFH is where ExecStop and ExecReload write: the service's log once
// stop has opened it.
var logFH *os.File

func output() *os.File {
	if logFH == nil {
		logFH = os.Stderr
	}
	return logFH
}

func logPath(name string) string {
	return root + "/var/log/" + strings.TrimSuffix(name, ".service") + ".log"
}

// keep records the definition a running unit was started with (its
// file, then its drop-ins), as systemd holds it in memory.
func keep(u *unit) {
	var b []byte
	for _, f := range u.sources {
		c, err := os.ReadFile(f)
		if err != nil {
			return
		}
		b = append(append(b, c...), '\n')
	}
	os.WriteFile(path(u.name, "loaded"), b, 0o644)
}

// reload: daemon-reload takes the files as they are now for every running
// unit whose file still exists.
func reload() {
	sups, _ := filepath.Glob(filepath.Join(runDir, "*.supervisor"))
	for _, sp := range sups {
		name := strings.TrimSuffix(filepath.Base(sp), ".supervisor")
		if !alive(readInt(sp)) {
			continue
		}
		for _, d := range unitDirs {
			if _, err := os.Stat(filepath.Join(d, name)); err == nil {
				keep(load(name))
				break
			}
		}
	}
}

func start(u *unit) {
	os.MkdirAll(runDir, 0o755)
	os.MkdirAll(root+"/run/systemd/system", 0o755)
	if !alive(readInt(path(u.name, "supervisor"))) {
		os.Remove(path(u.name, "stopping"))
		setState(u.name, "activating")
		keep(u)
		self, _ := os.Executable()
		lf, err := os.OpenFile(logPath(u.name), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			fatal(1, "%v", err)
		}
		c := exec.Command(self, "__supervise", u.name)
		c.Stdout, c.Stderr = lf, lf
		c.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := c.Start(); err != nil {
			fatal(1, "%s: starting the supervisor: %v", u.name, err)
		}
		os.WriteFile(path(u.name, "supervisor"), []byte(strconv.Itoa(c.Process.Pid)), 0o644)
		c.Process.Release()
		lf.Close()
	}
	// As systemctl start does, wait for the start job (a unit already
	// activating, e.g. restarting after a crash, is waited for too).
	dl := time.Now().Add(u.tStart + 2*time.Second)
	for time.Now().Before(dl) {
		switch state(u.name) {
		case "active":
			return
		case "failed", "inactive":
			fatal(1, "Job for %s failed. See %s.", u.name, logPath(u.name))
		}
		time.Sleep(50 * time.Millisecond)
	}
	fatal(1, "Job for %s timed out. See %s.", u.name, logPath(u.name))
}

func stop(name string) {
	sup := readInt(path(name, "supervisor"))
	if !alive(sup) {
		setState(name, "inactive")
		return
	}
	u := load(name)
	os.WriteFile(path(name, "stopping"), nil, 0o644)
	setState(name, "deactivating")
	pid := readInt(path(name, "pid"))
	lf, err := os.OpenFile(logPath(name), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err == nil {
		logFH = lf
	}
	for _, c := range u.execStop {
		if alive(pid) {
			if err := run(c, pid); err != nil {
				fmt.Fprintf(os.Stderr, "%s: ExecStop: %v\n", name, err)
			}
		}
	}
	if u.killMode == "process" && alive(pid) {
		syscall.Kill(pid, syscall.SIGTERM)
	}
	dl := time.Now().Add(u.tStop)
	for alive(pid) && time.Now().Before(dl) {
		time.Sleep(50 * time.Millisecond)
	}
	if alive(pid) {
		fmt.Fprintf(os.Stderr, "%s: still running %v after SIGTERM: SIGKILL to %d\n", name, u.tStop, pid)
		syscall.Kill(pid, syscall.SIGKILL)
	}
	for i := 0; i < 200 && alive(sup); i++ {
		time.Sleep(50 * time.Millisecond)
	}
}
