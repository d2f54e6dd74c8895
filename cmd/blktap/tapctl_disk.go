package main

// Naming a disk for tap-ctl: minors derived from xenstore keys, the disk
// a hotplug script's environment names, the daemon's process id.

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/blktap-go/blktap/reconciler"
	"github.com/blktap-go/blktap/xenstore"
)

// tapDisk is one disk the daemon serves, as tap-ctl shows it.
type tapDisk struct {
	key    reconciler.Key
	be     string
	typ    string // params' type as the toolstack wrote it ("aio", "vhd")
	path   string
	pid    int    // the worker's; 0 when none runs
	phase  string // blktap/phase
	errMsg string // blktap/error
	export string // blktap/export (an NBD URI)
	online bool
	state  int
}

func tapMinor(k reconciler.Key) int64 { return int64(k.Domid)<<29 | int64(k.Devid) }

// minorKey inverts tapMinor; ok is false for a minor no domain can have.
func minorKey(minor int64) (domid, devid uint32, ok bool) {
	if minor < 0 || minor>>29 >= 0x7ff0 { // DOMID_FIRST_RESERVED
		return 0, 0, false
	}
	return uint32(minor >> 29), uint32(minor & (1<<29 - 1)), true
}

var tapKinds = []string{reconciler.KindVBD3, reconciler.KindTap, reconciler.KindVBD}

// keyFromXenbusPath maps XENBUS_PATH (absolute, or relative to dom0's
// home as libxl's XENBUS_BASE_PATH is) to a device key.
func keyFromXenbusPath(p string) (reconciler.Key, error) {
	rel := strings.TrimPrefix(p, "/local/domain/0/")
	parts := strings.Split(strings.Trim(rel, "/"), "/")
	if len(parts) != 4 || parts[0] != "backend" {
		return reconciler.Key{}, fmt.Errorf("XENBUS_PATH %q is not a backend device directory of domain 0", p)
	}
	ok := false
	for _, k := range tapKinds {
		ok = ok || parts[1] == k
	}
	dom, err1 := strconv.ParseUint(parts[2], 10, 32)
	dev, err2 := strconv.ParseUint(parts[3], 10, 32)
	if !ok || err1 != nil || err2 != nil || dom >= 0x7ff0 || dev >= 1<<29 {
		return reconciler.Key{}, fmt.Errorf("XENBUS_PATH %q is not a disk blktap-go serves", p)
	}
	return reconciler.Key{Kind: parts[1], Domid: uint32(dom), Devid: uint32(dev)}, nil
}

// readDisk reads one backend directory; ok is false when it is gone.
func (t *tapCtl) readDisk(k reconciler.Key) (*tapDisk, bool, error) {
	xs, err := t.client()
	if err != nil {
		return nil, false, err
	}
	be := k.BackendPath(0)
	params, err := xs.Read(t.ctx, be+"/params")
	if errors.Is(err, xenstore.ErrNotFound) {
		if ok, _ := xs.Exists(t.ctx, be); !ok {
			return nil, false, nil
		}
	} else if err != nil {
		return nil, false, err
	}
	d := &tapDisk{key: k, be: be}
	if typ, path, ok := strings.Cut(params, ":"); ok {
		d.typ, d.path = typ, path
	} else if params != "" {
		d.typ, d.path = "aio", params
	}
	read := func(rel string) string {
		v, _ := xs.Read(t.ctx, be+"/"+rel)
		return v
	}
	d.pid, _ = strconv.Atoi(read("blktap/worker-pid"))
	d.phase = read("blktap/phase")
	d.errMsg = read("blktap/error")
	d.export = read("blktap/export")
	d.online = read("online") != "0"
	d.state, _ = strconv.Atoi(read("state"))
	return d, true, nil
}

// disks lists every disk under the daemon's backend kinds, by minor.
func (t *tapCtl) disks() ([]*tapDisk, error) {
	xs, err := t.client()
	if err != nil {
		return nil, err
	}
	var out []*tapDisk
	for _, kind := range tapKinds {
		root := "/local/domain/0/backend/" + kind
		doms, err := xs.Directory(t.ctx, root)
		if errors.Is(err, xenstore.ErrNotFound) {
			continue
		} else if err != nil {
			return nil, err
		}
		for _, dom := range doms {
			devs, err := xs.Directory(t.ctx, root+"/"+dom)
			if err != nil {
				continue // removed meanwhile
			}
			for _, dev := range devs {
				k, err := keyFromXenbusPath(root + "/" + dom + "/" + dev)
				if err != nil {
					continue
				}
				if d, ok, err := t.readDisk(k); err != nil {
					return nil, err
				} else if ok {
					out = append(out, d)
				}
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return tapMinor(out[i].key) < tapMinor(out[j].key) })
	return out, nil
}

// envDisk is the disk XENBUS_PATH names, if set.
func envDisk() (reconciler.Key, bool, error) {
	p := os.Getenv("XENBUS_PATH")
	if p == "" {
		return reconciler.Key{}, false, nil
	}
	k, err := keyFromXenbusPath(p)
	return k, err == nil, err
}

// hotplugDisk is the disk XENBUS_PATH names, read from xenstore, for the
// commands that work only inside a hotplug script; without XENBUS_PATH
// they refuse, saying refusal.
func (t *tapCtl) hotplugDisk(refusal string) (reconciler.Key, *tapDisk, error) {
	k, ok, err := envDisk()
	if err != nil {
		return k, nil, err
	}
	if !ok {
		return k, nil, refusef("%s", refusal)
	}
	d, ok, err := t.readDisk(k)
	if err != nil {
		return k, nil, err
	}
	if !ok {
		return k, nil, fmt.Errorf("no disk at %s", k.BackendPath(0))
	}
	return k, d, nil
}

// target resolves -m (and XENBUS_PATH) to the disk: both may name it and
// must then agree. A minor without a disk behind it is an error.
func (t *tapCtl) target(o tapOpts, needMinor bool) (*tapDisk, error) {
	envKey, haveEnv, err := envDisk()
	if err != nil {
		return nil, err
	}
	return t.resolve(o, needMinor, envKey, haveEnv)
}

// byMinor resolves -m alone, whatever XENBUS_PATH says. The releasing
// commands use it: block-tap's remove passes the pid and minor it stored,
// which for a disk sharing another's image (a stub domain's) are that
// other disk's, as they would name that disk's one tapdisk in blktap3.
func (t *tapCtl) byMinor(o tapOpts) (*tapDisk, error) {
	return t.resolve(o, true, reconciler.Key{}, false)
}

func (t *tapCtl) resolve(o tapOpts, needMinor bool, envKey reconciler.Key, haveEnv bool) (*tapDisk, error) {
	var err error
	ms, haveMinor := o['m']
	if needMinor && !haveMinor {
		return nil, usagef("-m minor is required")
	}
	var minor int64 = -1
	if haveMinor {
		if minor, err = strconv.ParseInt(ms, 10, 64); err != nil || minor < 0 {
			return nil, usagef("-m %q: want a minor number", ms)
		}
	}
	if haveEnv {
		if haveMinor && minor != tapMinor(envKey) {
			return nil, fmt.Errorf("minor %d is not the minor of %s (%d)", minor, envKey, tapMinor(envKey))
		}
		d, ok, err := t.readDisk(envKey)
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, fmt.Errorf("%w at %s", errNoDisk, envKey.BackendPath(0))
		}
		return d, nil
	}
	if !haveMinor {
		return nil, refusef("no disk named: set -m MINOR (see `tap-ctl list`) or XENBUS_PATH")
	}
	dom, dev, ok := minorKey(minor)
	if !ok {
		return nil, fmt.Errorf("%w with minor %d", errNoDisk, minor)
	}
	for _, kind := range tapKinds {
		k := reconciler.Key{Kind: kind, Domid: dom, Devid: dev}
		if d, ok, err := t.readDisk(k); err != nil {
			return nil, err
		} else if ok {
			return d, nil
		}
	}
	return nil, fmt.Errorf("%w with minor %d", errNoDisk, minor)
}

// checkPid accepts -p when absent or when it names the disk's worker or
// the daemon (what `spawn` prints before a worker runs). Other commands
// use the minor alone: the daemon may have restarted the worker since.
func (t *tapCtl) checkPid(o tapOpts, d *tapDisk) error {
	ps, ok := o['p']
	if !ok {
		return nil
	}
	pid, err := strconv.Atoi(ps)
	if err != nil || pid <= 0 {
		return usagef("-p %q: want a process id", ps)
	}
	if pid == d.pid {
		return nil
	}
	if dp, err := daemonPid(t.stateDir); err == nil && dp == pid {
		return nil
	}
	return fmt.Errorf("pid %d serves no disk with minor %d (the worker of %s is %s)",
		pid, tapMinor(d.key), d.key, pidString(d.pid))
}

func pidString(p int) string {
	if p == 0 {
		return "not running"
	}
	return strconv.Itoa(p)
}

// daemonPid asks the kernel who listens on the daemon's API socket.
func daemonPid(stateDir string) (int, error) {
	c, err := net.DialTimeout("unix", filepath.Join(stateDir, reconciler.APISocket), 2*time.Second)
	if err != nil {
		return 0, fmt.Errorf("the blktap daemon is not running (state directory %s): %w", stateDir, err)
	}
	defer c.Close()
	raw, err := c.(*net.UnixConn).SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *syscall.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if serr != nil {
		return 0, serr
	}
	return int(cred.Pid), nil
}
