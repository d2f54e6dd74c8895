// Command systemctl is the real-Xen harness's stand-in for systemd in its
// initramfs dom0, which has no systemd to run as PID 1. It reads the
// installed unit (and its drop-ins) the way systemd does and emulates the
// parts of it blktap.service relies on, so that the harness exercises the
// unit file as shipped, not a copy of its command line:
//
//   - ExecStart, ExecStop, ExecReload with $MAINPID, "-" prefixes and
//     systemd's quoting; drop-ins (an empty ExecStart= resets the list);
//   - Type=notify: the start job waits for READY=1 on $NOTIFY_SOCKET;
//     Type=simple: started once the process runs;
//   - KillMode=process: stop signals the main process only, so everything
//     it started outlives it; KillMode=none likewise sends nothing after
//     ExecStop; other modes are refused, as they are not emulated;
//   - Restart=on-failure/always/no with RestartSec;
//   - TimeoutStartSec, TimeoutStopSec (SIGKILL to the main process after);
//   - start, stop, restart, try-restart, reload, status, is-active,
//     is-enabled (always enabled), show -p MainPID, is-system-running, and daemon-reload, enable,
//     disable, mask, unmask as no-ops that succeed.
//
// A unit's state lives in /run/xt-systemd/UNIT.*; a supervisor process
// (this binary, "__supervise") owns the main process as systemd would and
// restarts it. Output of the service goes to /var/log/NAME.log, the
// harness's stand-in for the journal. /run/systemd/system exists while this
// runs, so maintainer scripts take their systemd path.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// root prefixes every path used here. It is empty in the harness; tests set
// XT_SYSTEMD_ROOT to run the real binary inside a temporary directory.
var root = os.Getenv("XT_SYSTEMD_ROOT")

var runDir = root + "/run/xt-systemd"

var unitDirs = []string{root + "/etc/systemd/system", root + "/run/systemd/system", root + "/lib/systemd/system", root + "/usr/lib/systemd/system"}

type unit struct {
	name                      string
	execStart, execStop, rel  [][]string
	typ, killMode, restart    string
	restartSec, tStart, tStop time.Duration
	file                      string
	sources                   []string
}

func main() {
	cmd, name, rest := parseArgs(os.Args[1:])
	if cmd == "" {
		fatal(2, "usage: systemctl COMMAND [UNIT]")
	}
	if global(cmd) {
		return
	}
	if name == "" {
		fatal(2, "systemctl %s: no unit given", cmd)
	}
	unitCommand(cmd, name, rest)
}

// parseArgs finds the command, the unit it names (".service" added when
// no suffix is given) and the arguments after the command. Options before
// the command change nothing here and are dropped.
func parseArgs(args []string) (cmd, name string, rest []string) {
	for len(args) > 0 && strings.HasPrefix(args[0], "-") {
		args = args[1:]
	}
	if len(args) == 0 {
		return "", "", nil
	}
	cmd, rest = args[0], args[1:]
	for _, a := range rest {
		if !strings.HasPrefix(a, "-") && !strings.Contains(a, "=") && a != "MainPID" {
			name = a
			break
		}
	}
	if name != "" && !strings.Contains(name, ".") {
		name += ".service"
	}
	return cmd, name, rest
}

// global runs the commands that name no unit and reports whether cmd was one.
func global(cmd string) bool {
	switch cmd {
	case "daemon-reload":
		reload()
	case "enable", "disable", "mask", "unmask", "reset-failed", "preset":
	case "is-system-running":
		if _, err := os.Stat(filepath.Join(runDir, "system-stopping")); err == nil {
			fmt.Println("stopping")
		} else {
			fmt.Println("running")
		}
	default:
		return false
	}
	return true
}

func unitCommand(cmd, name string, rest []string) {
	quiet := hasArg(rest, "--quiet", "-q")
	switch cmd {
	case "__supervise":
		supervise(load(name))
	case "start":
		start(load(name))
	case "stop":
		stop(name)
	case "restart":
		restart(name)
	case "try-restart":
		if active(name) {
			restart(name)
		}
	case "reload":
		reloadUnit(name)
	case "is-enabled":
		// Enablement is not tracked: dom0 starts nothing at boot by
		// itself, so every installed unit counts as enabled.
		load(name)
		if !quiet {
			fmt.Println("enabled")
		}
	case "is-active":
		isActive(name, quiet)
	case "status":
		status(name)
	case "show":
		fmt.Printf("MainPID=%d\n", mainPID(name))
	default:
		fatal(1, "systemctl %s: not emulated by the harness's stand-in", cmd)
	}
}

// restart loads the unit before stopping it, so a unit whose file is gone
// restarts from the definition it runs with.
func restart(name string) {
	u := load(name)
	stop(name)
	start(u)
}

func reloadUnit(name string) {
	u := load(name)
	if !active(name) {
		fatal(1, "Job for %s failed: the unit is not active.", name)
	}
	for _, c := range u.rel {
		if err := run(c, mainPID(name)); err != nil {
			fatal(1, "%s: ExecReload: %v", name, err)
		}
	}
}

func isActive(name string, quiet bool) {
	st := state(name)
	if !quiet {
		fmt.Println(st)
	}
	if st != "active" {
		os.Exit(3)
	}
}

func status(name string) {
	st := state(name)
	fmt.Printf("* %s - emulated by the harness's systemctl stand-in\n   Active: %s\n", name, st)
	if p := mainPID(name); p > 0 {
		fmt.Printf(" Main PID: %d\n", p)
	}
	if st != "active" {
		os.Exit(3)
	}
}

func hasArg(args []string, names ...string) bool {
	for _, a := range args {
		for _, n := range names {
			if a == n {
				return true
			}
		}
	}
	return false
}

func fatal(code int, f string, a ...any) {
	fmt.Fprintf(os.Stderr, f+"\n", a...)
	os.Exit(code)
}
