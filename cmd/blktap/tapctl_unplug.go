package main

// The commands that take a disk down (destroy, close), and pause,
// unpause, stats and create.

import (
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/reconciler"
)

// destroy and close: the daemon stops a disk's worker when the toolstack
// takes the disk offline (online=0, backend Closing/Closed), which libxl
// does before it runs the remove script. They wait for that; on a disk
// still online they refuse, since only the toolstack may unplug it.
func (t *tapCtl) destroy(o tapOpts) error {
	if !o.has('p') {
		return usagef("-p pid is required")
	}
	return t.stop(o)
}

func (t *tapCtl) close(o tapOpts) error {
	if !o.has('p') {
		return usagef("-p pid is required")
	}
	return t.stop(o)
}

func (t *tapCtl) stop(o tapOpts) error {
	wait := tapCtlWait()
	if s, ok := o['t']; ok {
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 {
			return usagef("-t %q: want seconds", s)
		}
		wait = time.Duration(n) * time.Second
	}
	d, err := t.byMinor(o)
	if err != nil {
		if errors.Is(err, errNoDisk) {
			unlinkExport(o['p'], mustMinor(o['m']))
			return nil // gone already: nothing left to stop
		}
		return err
	}
	minor := tapMinor(d.key)
	defer unlinkExport(o['p'], minor)
	if d.online && d.state != int(reconciler.StateClosing) && d.state != int(reconciler.StateClosed) {
		return refusef("%s is still online; the daemon stops it when the toolstack unplugs it (xl block-detach)", d.key)
	}
	deadline := time.Now().Add(wait)
	for d.pid != 0 {
		if time.Now().After(deadline) {
			return fmt.Errorf("the worker of %s (pid %d) is still running after %s (phase %q)", d.key, d.pid, wait, d.phase)
		}
		select {
		case <-t.ctx.Done():
			return t.ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		var ok bool
		if d, ok, err = t.readDisk(d.key); err != nil {
			return err
		} else if !ok {
			return nil
		}
	}
	return nil
}

func mustMinor(s string) int64 {
	n, _ := strconv.ParseInt(s, 10, 64)
	return n
}

func (t *tapCtl) pause(o tapOpts) error {
	d, err := t.target(o, true)
	if err != nil {
		return err
	}
	if err := t.checkPid(o, d); err != nil {
		return err
	}
	return reconciler.DeviceCall(t.ctx, t.stateDir, d.key, "pause", reconciler.DeviceOp{})
}

func (t *tapCtl) unpause(o tapOpts) error {
	for _, c := range []byte{'2', 'c'} {
		if o.has(c) {
			return refusef("unpause -%c: no secondary image or change log", c)
		}
	}
	d, err := t.target(o, true)
	if err != nil {
		return err
	}
	if err := t.checkPid(o, d); err != nil {
		return err
	}
	var op reconciler.DeviceOp
	if a, ok := o['a']; ok {
		typ, path, _ := strings.Cut(a, ":")
		if path == "" {
			return usagef("-a %q: want type:/path/to/file", a)
		}
		if op.Format, err = formats.Normalize(typ); err != nil {
			return err
		}
		op.Path = path
	}
	return reconciler.DeviceCall(t.ctx, t.stateDir, d.key, "resume", op)
}

// stats prints the worker's counters as JSON, as the daemon reports them.
func (t *tapCtl) stats(o tapOpts) error {
	d, err := t.target(o, true)
	if err != nil {
		return err
	}
	if err := t.checkPid(o, d); err != nil {
		return err
	}
	all, err := reconciler.FetchStats(t.ctx, t.stateDir)
	if err != nil {
		return err
	}
	for _, s := range all {
		if s.Device == d.key.String() {
			if s.Error != "" {
				return errors.New(s.Error)
			}
			out := map[string]any{"name": d.typ + ":" + d.path, "minor": tapMinor(d.key), "pid": s.WorkerPid, "stats": s.Stats}
			b, err := json.Marshal(out)
			if err != nil {
				return err
			}
			fmt.Println(string(b))
			return nil
		}
	}
	return fmt.Errorf("no worker serves %s", d.key)
}

// create is allocate, spawn, attach and open in one, for the disk
// XENBUS_PATH names; it prints the minor's device name.
func (t *tapCtl) create(o tapOpts) error {
	for _, c := range []byte{'e', '2', 's', 'C', 'd'} {
		if o.has(c) {
			return refusef("create -%c: the daemon serves the image xenstore declares, as xenstore declares it", c)
		}
	}
	k, ok, err := envDisk()
	if err != nil {
		return err
	}
	if !ok {
		return refusef("disks come from xenstore (a toolstack, or `blktap attach`); run from a hotplug script (XENBUS_PATH)")
	}
	args, ok := o['a']
	if !ok {
		return usagef("-a type:/path/to/file is required")
	}
	d, ok, err := t.readDisk(k)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("no disk at %s", k.BackendPath(0))
	}
	typ, path, _ := strings.Cut(args, ":")
	if path == "" || !sameFormat(typ, d.typ) || filepath.Clean(path) != filepath.Clean(d.path) {
		return fmt.Errorf("%s is not the image xenstore declares for %s (%s:%s)", args, d.key, d.typ, d.path)
	}
	if d, err = t.waitOpen(k); err != nil {
		return err
	}
	linkExport(d, strconv.Itoa(d.pid))
	fmt.Println(tapDevName(tapMinor(k)))
	return nil
}
