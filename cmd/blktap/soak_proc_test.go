package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// What the soak samples of its processes, read from /proc only: the
// daemon's control API is under test and must not be the witness.

// procUsage is the resources of one set of processes at one moment.
type procUsage struct {
	rssKiB, pssKiB int
	fds, sockets   int
}

func (u procUsage) add(o procUsage) procUsage {
	return procUsage{u.rssKiB + o.rssKiB, u.pssKiB + o.pssKiB, u.fds + o.fds, u.sockets + o.sockets}
}

// usageOf reads pid's resident and proportional set sizes and counts its
// open descriptors, and among them its sockets. A process that is gone
// counts nothing: workers die under the soak's killer at any moment.
func usageOf(pid int) procUsage {
	var u procUsage
	dir := fmt.Sprintf("/proc/%d", pid)
	if b, err := os.ReadFile(dir + "/smaps_rollup"); err == nil {
		u.rssKiB = kibField(b, "Rss:")
		u.pssKiB = kibField(b, "Pss:")
	}
	fds, err := os.ReadDir(dir + "/fd")
	if err != nil {
		return u
	}
	for _, fd := range fds {
		target, err := os.Readlink(filepath.Join(dir, "fd", fd.Name()))
		if err != nil {
			continue // closed since the listing
		}
		u.fds++
		if strings.HasPrefix(target, "socket:") {
			u.sockets++
		}
	}
	return u
}

// kibField returns the value of a "Name:   123 kB" line of smaps_rollup.
func kibField(b []byte, name string) int {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 2 && f[0] == name {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	return 0
}

// childrenOf lists the processes whose parent is ppid: the daemon's are
// its workers, one per served disk.
func childrenOf(ppid int) []int {
	var kids []int
	forEachProc(func(pid int) {
		if parentOf(pid) == ppid {
			kids = append(kids, pid)
		}
	})
	return kids
}

// workersOf lists every live worker process of the binary exe, whoever
// its parent: after the daemon's shutdown there must be none (one whose
// daemon died is reparented, and childrenOf would not see it).
func workersOf(exe string) []int {
	var pids []int
	forEachProc(func(pid int) {
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || !bytes.Contains(cmdline, []byte("\x00__worker\x00")) {
			return
		}
		if self, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); err == nil && self == exe {
			pids = append(pids, pid)
		}
	})
	return pids
}

func forEachProc(f func(pid int)) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			f(pid)
		}
	}
}

// parentOf reads the parent pid from /proc/PID/stat, whose second field
// (the command, in parentheses) may itself hold spaces and parentheses.
func parentOf(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return -1
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return -1
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 2 {
		return -1
	}
	ppid, err := strconv.Atoi(f[1])
	if err != nil {
		return -1
	}
	return ppid
}

// unixSocketsUnder counts the unix sockets bound to a path under dir
// (the daemon's API and the exports), listening or accepted, from
// /proc/net/unix.
func unixSocketsUnder(dir string) int {
	b, err := os.ReadFile("/proc/net/unix")
	if err != nil {
		return 0
	}
	n := 0
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 8 && strings.HasPrefix(f[7], dir+"/") {
			n++
		}
	}
	return n
}

// sparkline draws v as one character per value, lowest to highest of v.
func sparkline(v []float64) string {
	const bars = "▁▂▃▄▅▆▇█"
	steps := []rune(bars)
	if len(v) == 0 {
		return ""
	}
	lo, hi := v[0], v[0]
	for _, x := range v {
		lo, hi = min(lo, x), max(hi, x)
	}
	var b strings.Builder
	for _, x := range v {
		i := 0
		if hi > lo {
			i = int((x - lo) / (hi - lo) * float64(len(steps)-1))
		}
		b.WriteRune(steps[i])
	}
	return b.String()
}

// thirdsSlope compares the mean of the last third of v with the mean of
// the first: the growth of a curve that should be flat, as a fraction.
func thirdsSlope(v []float64) (first, last, growth float64) {
	n := len(v) / 3
	if n == 0 {
		return 0, 0, 0
	}
	mean := func(s []float64) float64 {
		t := 0.0
		for _, x := range s {
			t += x
		}
		return t / float64(len(s))
	}
	first, last = mean(v[:n]), mean(v[len(v)-n:])
	if first == 0 {
		return first, last, 0
	}
	return first, last, last/first - 1
}
