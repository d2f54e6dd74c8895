package main

// tap-ctl: blktap3's control tool, emulated over the daemon so that Xen's
// stock hotplug script (/etc/xen/scripts/block-tap, run by libxl >= 4.19
// for backendtype=tap disks) works unchanged. There is no tapdisk process
// to spawn and no minor to allocate here: the daemon has already opened the
// image when libxl runs the script (it puts the backend in InitWait only
// then), so each command maps onto a disk the daemon serves and either
// reports on it, waits for it, or says plainly that it cannot be done.
// docs/TAP-CTL.md lists what is emulated and what is refused.
//
// A disk is named by the environment the hotplug script inherits
// (XENBUS_PATH, set by libxl) or by its minor. Minors are not allocated:
// a disk's minor is derived from its xenstore key, so every invocation, and
// every daemon restart, agrees on it:
//
//	minor = domid<<29 | devid     (devid < 2^29 holds every vdev encoding)

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/reconciler"
	"github.com/blktap-go/blktap/xenstore"
)

// tapCtlRunDir is blktap3's control directory: block-tap writes
// physical-device-path = tapCtlRunDir/nbd<pid>.<minor> (tapback's name for
// tapdisk's NBD socket) without asking tap-ctl, so `open` links that name
// to the daemon's export socket when the disk has one.
const tapCtlRunDir = "/run/blktap-control"

// tapCtlNPDir is where blktap3 without the kernel module names its minors;
// `allocate` prints a path under it, which block-tap strips to the number.
const tapCtlNPDir = tapCtlRunDir + "/tapdisk"

// tapCtlWait bounds how long open, close and destroy wait for the daemon.
// libxl gives a hotplug script a limited time, so this stays short; the
// environment may change it (BLKTAP_TAPCTL_TIMEOUT, in seconds).
func tapCtlWait() time.Duration {
	if s := os.Getenv("BLKTAP_TAPCTL_TIMEOUT"); s != "" {
		if n, err := strconv.Atoi(s); err == nil && n > 0 {
			return time.Duration(n) * time.Second
		}
	}
	return 20 * time.Second
}

type tapCtlCmd struct {
	name  string
	opts  string // getopt(3) spec
	usage string
	run   func(t *tapCtl, o tapOpts) error
}

var tapCtlCommands = []tapCtlCmd{
	{"list", "p:m:t:f:h", "list [-p pid] [-m minor] [-t type] [-f file]", (*tapCtl).list},
	{"allocate", "h", "allocate", (*tapCtl).allocate},
	{"free", "m:h", "free <-m minor>", (*tapCtl).free},
	{"create", "a:RDd:e:r2:st:C:h", "create <-a type:/path/to/file> [-R]", (*tapCtl).create},
	{"destroy", "p:m:t:h", "destroy <-p pid> <-m minor> [-t timeout secs]", (*tapCtl).destroy},
	{"spawn", "h", "spawn", (*tapCtl).spawn},
	{"attach", "p:m:h", "attach <-p pid> <-m minor>", (*tapCtl).attach},
	{"detach", "p:m:h", "detach <-p pid> <-m minor>", (*tapCtl).detach},
	{"open", "a:RDm:p:e:r2:st:C:Eh", "open <-p pid> <-m minor> <-a type:/path/to/file> [-R] [-D] [-t secs]", (*tapCtl).open},
	{"close", "p:m:ft:h", "close <-p pid> <-m minor> [-f] [-t timeout secs]", (*tapCtl).close},
	{"pause", "p:m:t:h", "pause <-p pid> <-m minor> [-t timeout secs]", (*tapCtl).pause},
	{"unpause", "p:m:a:2:c:h", "unpause <-p pid> <-m minor> [-a type:/path/to/file]", (*tapCtl).unpause},
	{"stats", "p:m:h", "stats <-p pid> <-m minor>", (*tapCtl).stats},
}

func tapCtlUsage(w io.Writer) {
	fmt.Fprintf(w, "usage: tap-ctl COMMAND [OPTIONS]\n(blktap-go's tap-ctl: the commands act on disks `blktap run` serves; see docs/TAP-CTL.md)\n")
	for _, c := range tapCtlCommands {
		fmt.Fprintf(w, "  %s\n", c.usage)
	}
}

// tapOpts holds parsed options: the letter, and its argument ("" for a
// flag without one).
type tapOpts map[byte]string

func (o tapOpts) has(c byte) bool { _, ok := o[c]; return ok }

// getopt parses args as getopt(3) with spec would (clustered flags,
// "-pN" and "-p N", "--" ends options). tap-ctl takes no positional
// arguments, so any is a usage error.
func getopt(spec string, args []string) (tapOpts, error) {
	o := tapOpts{}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			if i+1 < len(args) {
				return nil, usagef("unexpected argument %q", args[i+1])
			}
			break
		}
		if len(a) < 2 || a[0] != '-' {
			return nil, usagef("unexpected argument %q", a)
		}
		for j := 1; j < len(a); j++ {
			c := a[j]
			k := strings.IndexByte(spec, c)
			if k < 0 || c == ':' {
				return nil, usagef("unknown option -%c", c)
			}
			if k+1 < len(spec) && spec[k+1] == ':' {
				switch {
				case j+1 < len(a):
					o[c] = a[j+1:]
				case i+1 < len(args):
					i++
					o[c] = args[i]
				default:
					return nil, usagef("option -%c needs an argument", c)
				}
				break
			}
			o[c] = ""
		}
	}
	return o, nil
}

// cmdTapCtl is tap-ctl's main: argv[0] "tap-ctl" lands here.
func cmdTapCtl(args []string) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		w := os.Stdout
		if len(args) == 0 {
			w = os.Stderr
		}
		tapCtlUsage(w)
		if len(args) == 0 {
			return exitCode(2)
		}
		return nil
	}
	var c *tapCtlCmd
	for i := range tapCtlCommands {
		if tapCtlCommands[i].name == args[0] {
			c = &tapCtlCommands[i]
		}
	}
	if c == nil {
		return refusef("%s: not a tap-ctl command blktap-go emulates", args[0])
	}
	o, err := getopt(c.opts, args[1:])
	if err != nil {
		fmt.Fprintf(os.Stderr, "tap-ctl: %s: %v\nusage: tap-ctl %s\n", c.name, err, c.usage)
		return exitCode(2)
	}
	if o.has('h') {
		fmt.Printf("usage: tap-ctl %s\n", c.usage)
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	t := &tapCtl{ctx: ctx, cmd: c.name, stateDir: defaultStateDir()}
	defer t.closeXS()
	if err := c.run(t, o); err != nil {
		var ue *usageError
		if errors.As(err, &ue) {
			fmt.Fprintf(os.Stderr, "tap-ctl: %s: %s\nusage: tap-ctl %s\n", c.name, ue.msg, c.usage)
			return exitCode(2)
		}
		return fmt.Errorf("%s: %w", c.name, err)
	}
	return nil
}

// errNoDisk: the minor or XENBUS_PATH names no disk (any more).
var errNoDisk = errors.New("no such disk")

// refusef is an operation tap-ctl cannot emulate over the daemon.
func refusef(format string, args ...any) error {
	return fmt.Errorf("not supported by blktap-go: "+format, args...)
}

// tapCtl is one invocation: the daemon's state directory and a lazily
// dialled xenstore connection.
type tapCtl struct {
	ctx      context.Context
	cmd      string
	stateDir string
	xs       *xenstore.Client
}

func (t *tapCtl) client() (*xenstore.Client, error) {
	if t.xs != nil {
		return t.xs, nil
	}
	xs, err := dialXenstore(t.ctx, t.stateDir, "")
	if err != nil {
		return nil, err
	}
	t.xs = xs
	return xs, nil
}

func (t *tapCtl) closeXS() {
	if t.xs != nil {
		t.xs.Close()
	}
}

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
	k, ok, err := envDisk()
	if err != nil {
		return err
	}
	if !ok {
		return refusef("minors are not allocated: each disk in xenstore has one; run from a hotplug script (XENBUS_PATH) or see `tap-ctl list`")
	}
	if _, ok, err := t.readDisk(k); err != nil {
		return err
	} else if !ok {
		return fmt.Errorf("no disk at %s", k.BackendPath(0))
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
	k, ok, err := envDisk()
	if err != nil {
		return err
	}
	if !ok {
		return refusef("tapdisk processes are started by `blktap run` for disks in xenstore; run from a hotplug script (XENBUS_PATH)")
	}
	d, ok, err := t.readDisk(k)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("no disk at %s", k.BackendPath(0))
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
