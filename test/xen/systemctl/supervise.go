package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// supervise runs the main process, restarts it as Restart= says and
// records its state, until a stop.
func supervise(u *unit) {
	sock := path(u.name, "notify")
	ready := listenNotify(u, sock)
	for {
		werr := runMain(u, sock, ready)
		again, final := exitOutcome(u.restart, werr, stopping(u.name))
		if again {
			setState(u.name, "activating")
			time.Sleep(u.restartSec)
			if !stopping(u.name) {
				continue
			}
			final = "inactive"
		}
		setState(u.name, final)
		os.Exit(0)
	}
}

// exitOutcome says what follows an exit of the main process: run it again,
// or the state the unit ends in. A stop in progress ends it inactive.
func exitOutcome(restart string, werr error, stopping bool) (again bool, final string) {
	if stopping {
		return false, "inactive"
	}
	failed := werr != nil && !cleanSignal(werr)
	if restart == "always" || (restart == "on-failure" && failed) {
		return true, ""
	}
	if failed {
		return false, "failed"
	}
	return false, "inactive"
}

func stopping(name string) bool { _, err := os.Stat(path(name, "stopping")); return err == nil }

// listenNotify opens $NOTIFY_SOCKET; the channel gets a value for each
// READY=1 (at most one pending: readiness is a level, not a count).
func listenNotify(u *unit, sock string) <-chan struct{} {
	os.Remove(sock)
	nc, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		setState(u.name, "failed")
		fatal(1, "%s: notify socket: %v", u.name, err)
	}
	ready := make(chan struct{}, 1)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, _, err := nc.ReadFromUnix(buf)
			if err != nil {
				return
			}
			if notifiesReady(buf[:n]) {
				select {
				case ready <- struct{}{}:
				default:
				}
			}
		}
	}()
	return ready
}

// notifiesReady: an sd_notify datagram is newline-separated assignments.
func notifiesReady(msg []byte) bool {
	for _, l := range strings.Split(string(msg), "\n") {
		if l == "READY=1" {
			return true
		}
	}
	return false
}

// runMain starts the main process once and returns how it exited.
func runMain(u *unit, sock string, ready <-chan struct{}) error {
	argv, _ := expand(u.execStart[0], 0)
	c := exec.Command(argv[0], argv[1:]...)
	c.Env = os.Environ()
	if u.typ == "notify" {
		c.Env = append(c.Env, "NOTIFY_SOCKET="+sock)
	}
	c.Stdout, c.Stderr, c.Stdin = os.Stdout, os.Stderr, nil
	select {
	case <-ready: // a READY=1 of the previous run does not count
	default:
	}
	t0 := time.Now()
	if err := c.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "xt-systemd: %s: %v\n", u.name, err)
		setState(u.name, "failed")
		os.Exit(1)
	}
	os.WriteFile(path(u.name, "pid"), []byte(strconv.Itoa(c.Process.Pid)), 0o644)
	fmt.Printf("xt-systemd: %s: started main process %d: %s\n", u.name, c.Process.Pid, strings.Join(argv, " "))
	exited := make(chan error, 1)
	go func() { exited <- c.Wait() }()
	if u.typ != "notify" {
		setState(u.name, "active")
	}
	werr := awaitExit(u, c.Process, ready, exited, t0)
	fmt.Printf("xt-systemd: %s: main process %d exited: %v\n", u.name, c.Process.Pid, describe(werr))
	return werr
}

// awaitExit marks the unit active on READY=1 and kills a main process that
// is not ready within TimeoutStartSec, until it exits.
func awaitExit(u *unit, p *os.Process, ready <-chan struct{}, exited <-chan error, t0 time.Time) error {
	timeout := time.After(u.tStart)
	for {
		select {
		case <-ready:
			fmt.Printf("xt-systemd: %s: READY=1 after %.1f s\n", u.name, time.Since(t0).Seconds())
			if !stopping(u.name) {
				setState(u.name, "active")
			}
		case <-timeout:
			if state(u.name) == "activating" {
				fmt.Printf("xt-systemd: %s: no READY=1 within %v: SIGKILL\n", u.name, u.tStart)
				p.Kill()
			}
		case werr := <-exited:
			return werr
		}
	}
}

// cleanSignal: systemd counts an exit by SIGHUP, SIGINT, SIGTERM or SIGPIPE
// as clean, so Restart=on-failure does not restart it.
func cleanSignal(err error) bool {
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return false
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() {
		return false
	}
	switch ws.Signal() {
	case syscall.SIGHUP, syscall.SIGINT, syscall.SIGTERM, syscall.SIGPIPE:
		return true
	}
	return false
}

func describe(err error) string {
	if err == nil {
		return "status=0"
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return "signal=" + ws.Signal().String()
		}
		return "status=" + strconv.Itoa(ee.ExitCode())
	}
	return err.Error()
}
