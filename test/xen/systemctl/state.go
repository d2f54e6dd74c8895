package main

// A unit's state as files under runDir, read by every invocation.

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

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
