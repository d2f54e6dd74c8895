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
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

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
