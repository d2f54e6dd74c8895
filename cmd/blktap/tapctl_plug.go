package main

// The commands block-tap runs to set a disk up (list, allocate, free,
// detach, spawn, attach, open) and the blktap3 socket names open links.

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/reconciler"
)

// list prints one line per disk a worker serves, in tap-ctl's forms: the
// "pid=.. minor=.. state=.. args=type:path" line when stdout is not a
// terminal (block-tap parses it), a table when it is.
//
// Inside a hotplug script (XENBUS_PATH set) the disk being plugged is
// left out: block-tap then takes its "new tapdisk" path (allocate, spawn,
// attach, open), whose open waits for the daemon and reports its error.
// Other disks of the same file are listed, so block-tap's sharing checks
// still see them.
func (t *tapCtl) list(o tapOpts) error {
	disks, err := t.disks()
	if err != nil {
		return err
	}
	envKey, haveEnv, _ := envDisk()
	tty := isTerminal(os.Stdout)
	if tty {
		fmt.Printf("%8s %4s %4s %10s %s\n", "pid", "minor", "state", "type", "file")
	}
	for _, d := range disks {
		if d.pid == 0 || (haveEnv && d.key == envKey) {
			continue
		}
		minor := tapMinor(d.key)
		if v, ok := o['p']; ok && v != strconv.Itoa(d.pid) {
			continue
		}
		if v, ok := o['m']; ok && v != strconv.FormatInt(minor, 10) {
			continue
		}
		if v, ok := o['t']; ok && !sameFormat(v, d.typ) {
			continue
		}
		if v, ok := o['f']; ok && filepath.Clean(v) != filepath.Clean(d.path) {
			continue
		}
		state := "0" // C's %#x of 0
		if d.phase == reconciler.PhasePaused {
			state = "0x2" // blktap3's "paused" bit
		}
		if tty {
			fmt.Printf("%8d %4d %4s %10s %s\n", d.pid, minor, state, d.typ, d.path)
		} else {
			fmt.Printf("pid=%d minor=%d state=%s args=%s:%s\n", d.pid, minor, state, d.typ, d.path)
		}
	}
	return nil
}

// sameFormat compares tap types: "aio" and "raw" are one format.
func sameFormat(a, b string) bool {
	if a == b {
		return true
	}
	na, err1 := formats.Normalize(a)
	nb, err2 := formats.Normalize(b)
	return err1 == nil && err2 == nil && na == nb
}

func tapDevName(minor int64) string { return fmt.Sprintf("%s/tapdisk-%d", tapCtlNPDir, minor) }

// allocate prints the minor of the disk XENBUS_PATH names.
func (t *tapCtl) allocate(o tapOpts) error {
	k, _, err := t.hotplugDisk("minors are not allocated: each disk in xenstore has one; run from a hotplug script (XENBUS_PATH) or see `tap-ctl list`")
	if err != nil {
		return err
	}
	fmt.Println(tapDevName(tapMinor(k)))
	return nil
}

// free and detach release nothing: the minor is the disk's own.
func (t *tapCtl) free(o tapOpts) error {
	_, err := t.byMinor(o)
	if errors.Is(err, errNoDisk) {
		return nil
	}
	return err
}

func (t *tapCtl) detach(o tapOpts) error {
	d, err := t.byMinor(o)
	if errors.Is(err, errNoDisk) {
		return nil
	}
	if err != nil {
		return err
	}
	return t.checkPid(o, d)
}

// spawn prints the pid that serves the disk XENBUS_PATH names: its worker,
// or the daemon itself while no worker runs (open then says why).
// Nothing is started: the daemon starts workers as xenstore declares disks.
func (t *tapCtl) spawn(o tapOpts) error {
	_, d, err := t.hotplugDisk("tapdisk processes are started by `blktap run` for disks in xenstore; run from a hotplug script (XENBUS_PATH)")
	if err != nil {
		return err
	}
	pid := d.pid
	if pid == 0 {
		// The daemon's own pid, so that open (and block-tap's message,
		// which names the image) reports why no worker runs. Without its
		// API socket (another --state-dir), a failed disk says why here.
		if pid, err = daemonPid(t.stateDir); err != nil && d.phase == reconciler.PhaseFailed {
			return fmt.Errorf("the daemon cannot open %s:%s: %s", d.typ, d.path, orUnknown(d.errMsg))
		} else if err != nil {
			return err
		}
	}
	if isTerminal(os.Stdout) {
		fmt.Printf("tapdisk spawned with pid %d\n", pid)
	} else {
		fmt.Println(pid)
	}
	return nil
}

func (t *tapCtl) attach(o tapOpts) error {
	if !o.has('p') {
		return usagef("-p pid is required")
	}
	d, err := t.target(o, true)
	if err != nil {
		return err
	}
	return t.checkPid(o, d)
}

// open waits until the daemon has the disk's image open, or fails with
// the daemon's reason. The image must be the one xenstore declares.
func (t *tapCtl) open(o tapOpts) error {
	for _, c := range []byte{'e', '2', 's', 'C', 'E'} {
		if o.has(c) {
			return refusef("open -%c: the daemon opens the image xenstore declares, with no secondary, parent stacking, change log or key", c)
		}
	}
	args, ok := o['a']
	if !ok {
		return usagef("-a type:/path/to/file is required")
	}
	if !o.has('p') {
		return usagef("-p pid is required")
	}
	d, err := t.target(o, true)
	if err != nil {
		return err
	}
	if err := t.checkPid(o, d); err != nil {
		return err
	}
	typ, path, _ := strings.Cut(args, ":")
	if path == "" || !sameFormat(typ, d.typ) || filepath.Clean(path) != filepath.Clean(d.path) {
		return fmt.Errorf("%s is not the image xenstore declares for %s (%s:%s)", args, d.key, d.typ, d.path)
	}
	d, err = t.waitOpen(d.key)
	if err != nil {
		return err
	}
	linkExport(d, o['p'])
	return nil
}

// waitOpen polls until a worker serves the disk with its image open.
func (t *tapCtl) waitOpen(k reconciler.Key) (*tapDisk, error) {
	deadline := time.Now().Add(tapCtlWait())
	for {
		d, ok, err := t.readDisk(k)
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, fmt.Errorf("%s was removed", k)
		}
		switch d.phase {
		case reconciler.PhaseWaiting, reconciler.PhaseConnected, reconciler.PhasePaused:
			if d.pid != 0 {
				return d, nil
			}
		case reconciler.PhaseFailed:
			return nil, fmt.Errorf("the daemon cannot open %s:%s: %s", d.typ, d.path, orUnknown(d.errMsg))
		case reconciler.PhaseClosing, reconciler.PhaseClosed:
			return nil, fmt.Errorf("%s is %s", k, d.phase)
		}
		if time.Now().After(deadline) {
			if d.errMsg != "" {
				return nil, fmt.Errorf("the daemon has not opened %s:%s (%s): %s", d.typ, d.path, d.phase, d.errMsg)
			}
			return nil, fmt.Errorf("the daemon has not opened %s:%s within %s (phase %q)", d.typ, d.path, tapCtlWait(), d.phase)
		}
		select {
		case <-t.ctx.Done():
			return nil, t.ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func orUnknown(s string) string {
	if s == "" {
		return "no reason given"
	}
	return s
}

// exportSocket is the unix socket of an nbd+unix URI, "" for others.
func exportSocket(uri string) string {
	u, err := url.Parse(uri)
	if err != nil || u.Scheme != "nbd+unix" {
		return ""
	}
	return u.Query().Get("socket")
}

func nbdLinkPath(pid string, minor int64) string {
	return fmt.Sprintf("%s/nbd%s.%d", tapCtlRunDir, pid, minor)
}

// linkExport makes the name block-tap is about to write as
// physical-device-path (tapCtlRunDir/nbd<pid>.<minor>) a symlink to the
// disk's NBD export socket, when the daemon serves one. Without an
// export (a guest's disk on a real host) there is nothing to point at.
// A link that cannot be made is reported, not fatal: the disk itself is
// served; only readers of physical-device-path (an HVM device model,
// pygrub) would miss it.
func linkExport(d *tapDisk, pid string) {
	sock := exportSocket(d.export)
	if sock == "" {
		return
	}
	link := nbdLinkPath(pid, tapMinor(d.key))
	if cur, err := os.Readlink(link); err == nil && cur == sock {
		return
	}
	err := os.MkdirAll(tapCtlRunDir, 0o755)
	if err == nil {
		os.Remove(link)
		err = os.Symlink(sock, link)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "tap-ctl: warning: %s will not reach the export of %s: %v\n", link, d.key, err)
	}
}

// unlinkExport removes that symlink (and nothing that is not one).
func unlinkExport(pid string, minor int64) {
	link := nbdLinkPath(pid, minor)
	if fi, err := os.Lstat(link); err == nil && fi.Mode()&os.ModeSymlink != 0 {
		os.Remove(link)
	}
}
