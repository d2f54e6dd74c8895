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
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const runDir = "/run/xt-systemd"

var unitDirs = []string{"/etc/systemd/system", "/run/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system"}

type unit struct {
	name                      string
	execStart, execStop, rel  [][]string
	typ, killMode, restart    string
	restartSec, tStart, tStop time.Duration
	file                      string
	sources                   []string
}

func main() {
	args := os.Args[1:]
	// Options systemctl callers pass that change nothing here.
	for len(args) > 0 && strings.HasPrefix(args[0], "-") {
		args = args[1:]
	}
	if len(args) == 0 {
		fatal(2, "usage: systemctl COMMAND [UNIT]")
	}
	cmd, rest := args[0], args[1:]
	var name string
	for _, a := range rest {
		if !strings.HasPrefix(a, "-") && !strings.Contains(a, "=") && a != "MainPID" {
			name = a
			break
		}
	}
	if name != "" && !strings.Contains(name, ".") {
		name += ".service"
	}
	switch cmd {
	case "daemon-reload":
		reload()
		return
	case "enable", "disable", "mask", "unmask", "reset-failed", "preset":
		return
	case "is-system-running":
		if _, err := os.Stat(filepath.Join(runDir, "system-stopping")); err == nil {
			fmt.Println("stopping")
			return
		}
		fmt.Println("running")
		return
	}
	if name == "" {
		fatal(2, "systemctl %s: no unit given", cmd)
	}
	switch cmd {
	case "__supervise":
		supervise(load(name))
	case "start":
		start(load(name))
	case "stop":
		stop(name)
	case "restart":
		u := load(name)
		stop(name)
		start(u)
	case "try-restart":
		if active(name) {
			u := load(name)
			stop(name)
			start(u)
		}
	case "reload":
		u := load(name)
		if !active(name) {
			fatal(1, "Job for %s failed: the unit is not active.", name)
		}
		for _, c := range u.rel {
			if err := run(c, mainPID(name)); err != nil {
				fatal(1, "%s: ExecReload: %v", name, err)
			}
		}
	case "is-enabled":
		// Enablement is not tracked: dom0 starts nothing at boot by
		// itself, so every installed unit counts as enabled.
		load(name)
		if !hasArg(rest, "--quiet", "-q") {
			fmt.Println("enabled")
		}
	case "is-active":
		st := state(name)
		if !hasArg(rest, "--quiet", "-q") {
			fmt.Println(st)
		}
		if st != "active" {
			os.Exit(3)
		}
	case "status":
		st := state(name)
		fmt.Printf("* %s - emulated by the harness's systemctl stand-in\n   Active: %s\n", name, st)
		if p := mainPID(name); p > 0 {
			fmt.Printf(" Main PID: %d\n", p)
		}
		if st != "active" {
			os.Exit(3)
		}
	case "show":
		fmt.Printf("MainPID=%d\n", mainPID(name))
	default:
		fatal(1, "systemctl %s: not emulated by the harness's stand-in", cmd)
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

func path(name, what string) string { return filepath.Join(runDir, name+"."+what) }

func readInt(p string) int {
	b, err := os.ReadFile(p)
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return n
}

func alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	if syscall.Kill(pid, 0) != nil {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	return len(f) > 0 && f[0] != "Z"
}

func mainPID(name string) int {
	if !alive(readInt(path(name, "supervisor"))) {
		return 0
	}
	return readInt(path(name, "pid"))
}

// state: "active", "activating" (started, not ready, or waiting to be
// restarted), "deactivating", "failed" or "inactive".
func state(name string) string {
	b, _ := os.ReadFile(path(name, "state"))
	st := strings.TrimSpace(string(b))
	if !alive(readInt(path(name, "supervisor"))) {
		if st == "failed" {
			return st
		}
		return "inactive"
	}
	if st == "" {
		return "activating"
	}
	return st
}

func active(name string) bool {
	st := state(name)
	return st == "active" || st == "activating" || st == "reloading"
}

func setState(name, st string) { os.WriteFile(path(name, "state"), []byte(st+"\n"), 0o644) }

// load reads the unit file and its drop-ins, later files overriding
// earlier ones key by key as systemd merges them.
func load(name string) *unit {
	u := &unit{name: name, typ: "simple", killMode: "control-group", restart: "no",
		restartSec: 100 * time.Millisecond, tStart: 90 * time.Second, tStop: 90 * time.Second}
	var files []string
	for _, d := range unitDirs {
		if _, err := os.Stat(filepath.Join(d, name)); err == nil {
			files = append(files, filepath.Join(d, name))
			break
		}
	}
	if len(files) == 0 {
		// systemd keeps a running unit's definition after its file is
		// gone (a package removed while it runs): so does this, from the
		// copy taken when it started or at the last daemon-reload.
		if _, err := os.Stat(path(name, "loaded")); err != nil || !alive(readInt(path(name, "supervisor"))) {
			fatal(5, "Unit %s not found.", name)
		}
		files = []string{path(name, "loaded")}
	}
	u.file = files[0]
	var drop []string
	for _, d := range unitDirs {
		m, _ := filepath.Glob(filepath.Join(d, name+".d", "*.conf"))
		drop = append(drop, m...)
	}
	sort.Slice(drop, func(i, j int) bool { return filepath.Base(drop[i]) < filepath.Base(drop[j]) })
	if u.file == path(name, "loaded") {
		drop = nil // the copy has them already
	}
	u.sources = append(files, drop...)
	for _, f := range u.sources {
		if err := parse(u, f); err != nil {
			fatal(1, "%s: %v", f, err)
		}
	}
	if len(u.execStart) != 1 {
		fatal(1, "%s: want one ExecStart=, have %d", name, len(u.execStart))
	}
	switch u.killMode {
	case "process", "none":
	default:
		fatal(1, "%s: KillMode=%s is not emulated by the harness's stand-in (only process, none)", name, u.killMode)
	}
	return u
}

func parse(u *unit, file string) error {
	fh, err := os.Open(file)
	if err != nil {
		return err
	}
	defer fh.Close()
	sc := bufio.NewScanner(fh)
	section, line := "", ""
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if strings.HasSuffix(l, "\\") {
			line += strings.TrimSuffix(l, "\\") + " "
			continue
		}
		l, line = line+l, ""
		if l == "" || l[0] == '#' || l[0] == ';' {
			continue
		}
		if l[0] == '[' {
			section = strings.Trim(l, "[]")
			continue
		}
		k, v, ok := strings.Cut(l, "=")
		if !ok || section != "Service" {
			continue
		}
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		switch k {
		case "ExecStart", "ExecStop", "ExecReload":
			dst := map[string]*[][]string{"ExecStart": &u.execStart, "ExecStop": &u.execStop, "ExecReload": &u.rel}[k]
			if v == "" {
				*dst = nil
				continue
			}
			w, err := split(v)
			if err != nil {
				return fmt.Errorf("%s=%s: %v", k, v, err)
			}
			*dst = append(*dst, w)
		case "Type":
			u.typ = v
		case "KillMode":
			u.killMode = v
		case "Restart":
			u.restart = v
		case "RestartSec":
			u.restartSec = dur(v, u.restartSec)
		case "TimeoutStartSec":
			u.tStart = dur(v, u.tStart)
		case "TimeoutStopSec":
			u.tStop = dur(v, u.tStop)
		case "TimeoutSec":
			u.tStart, u.tStop = dur(v, u.tStart), dur(v, u.tStop)
		}
	}
	return sc.Err()
}

// dur reads systemd's time spans as the unit uses them ("2s", "5min", "90").
func dur(v string, def time.Duration) time.Duration {
	v = strings.ReplaceAll(v, " ", "")
	if n, err := strconv.Atoi(v); err == nil {
		return time.Duration(n) * time.Second
	}
	v = strings.Replace(v, "min", "m", 1)
	if d, err := time.ParseDuration(v); err == nil {
		return d
	}
	return def
}

// split breaks a command line into words with systemd's quoting: single
// and double quotes group, a backslash escapes the next character.
func split(s string) ([]string, error) {
	var words []string
	var cur strings.Builder
	in, quote := false, byte(0)
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case quote != 0 && c == quote:
			quote = 0
		case quote == 0 && (c == '\'' || c == '"'):
			quote, in = c, true
		case c == '\\' && i+1 < len(s) && quote != '\'':
			i++
			cur.WriteByte(s[i])
			in = true
		case quote == 0 && (c == ' ' || c == '\t'):
			if in {
				words = append(words, cur.String())
				cur.Reset()
				in = false
			}
		default:
			cur.WriteByte(c)
			in = true
		}
	}
	if quote != 0 {
		return nil, errors.New("unterminated quote")
	}
	if in {
		words = append(words, cur.String())
	}
	if len(words) == 0 {
		return nil, errors.New("empty command")
	}
	return words, nil
}

// expand substitutes $MAINPID and ${MAINPID}, the one variable the unit uses.
func expand(w []string, pid int) (argv []string, ignoreFail bool) {
	p := strconv.Itoa(pid)
	for _, a := range w {
		argv = append(argv, strings.NewReplacer("${MAINPID}", p, "$MAINPID", p).Replace(a))
	}
	for len(argv[0]) > 0 && strings.ContainsRune("-@+!:", rune(argv[0][0])) {
		ignoreFail = ignoreFail || argv[0][0] == '-'
		argv[0] = argv[0][1:]
	}
	return argv, ignoreFail
}

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

func logPath(name string) string { return "/var/log/" + strings.TrimSuffix(name, ".service") + ".log" }

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
	os.MkdirAll("/run/systemd/system", 0o755)
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

// supervise runs the main process, restarts it as Restart= says and
// records its state, until a stop.
func supervise(u *unit) {
	sock := path(u.name, "notify")
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
			for _, l := range strings.Split(string(buf[:n]), "\n") {
				if l == "READY=1" {
					select {
					case ready <- struct{}{}:
					default:
					}
				}
			}
		}
	}()
	stopping := func() bool { _, err := os.Stat(path(u.name, "stopping")); return err == nil }
	for {
		argv, _ := expand(u.execStart[0], 0)
		c := exec.Command(argv[0], argv[1:]...)
		c.Env = os.Environ()
		if u.typ == "notify" {
			c.Env = append(c.Env, "NOTIFY_SOCKET="+sock)
		}
		c.Stdout, c.Stderr, c.Stdin = os.Stdout, os.Stderr, nil
		select {
		case <-ready:
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
		var werr error
		timeout := time.After(u.tStart)
	wait:
		for {
			select {
			case <-ready:
				fmt.Printf("xt-systemd: %s: READY=1 after %.1f s\n", u.name, time.Since(t0).Seconds())
				if !stopping() {
					setState(u.name, "active")
				}
			case <-timeout:
				if state(u.name) == "activating" {
					fmt.Printf("xt-systemd: %s: no READY=1 within %v: SIGKILL\n", u.name, u.tStart)
					c.Process.Kill()
				}
			case werr = <-exited:
				break wait
			}
		}
		fmt.Printf("xt-systemd: %s: main process %d exited: %v\n", u.name, c.Process.Pid, describe(werr))
		if stopping() {
			setState(u.name, "inactive")
			os.Exit(0)
		}
		failed := werr != nil && !cleanSignal(werr)
		if u.restart == "always" || (u.restart == "on-failure" && failed) {
			setState(u.name, "activating")
			time.Sleep(u.restartSec)
			if stopping() {
				setState(u.name, "inactive")
				os.Exit(0)
			}
			continue
		}
		if failed {
			setState(u.name, "failed")
		} else {
			setState(u.name, "inactive")
		}
		os.Exit(0)
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
