package main

// Reading unit files the way systemd does.

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

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
