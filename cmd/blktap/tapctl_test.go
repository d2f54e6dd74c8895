package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/reconciler"
	"github.com/blktap-go/blktap/xenstore"
)

func TestTapCtlGetopt(t *testing.T) {
	for _, c := range []struct {
		spec string
		args []string
		want tapOpts
		err  bool
	}{
		{"p:m:t:f:h", nil, tapOpts{}, false},
		{"p:m:t:f:h", []string{"-t", "aio", "-f", "/x y"}, tapOpts{'t': "aio", 'f': "/x y"}, false},
		{"p:m:h", []string{"-p12", "-m", "3"}, tapOpts{'p': "12", 'm': "3"}, false},
		{"p:m:ft:h", []string{"-fp", "7", "-m3"}, tapOpts{'f': "", 'p': "7", 'm': "3"}, false},
		{"p:m:h", []string{"-m"}, nil, true},          // argument missing
		{"p:m:h", []string{"-x"}, nil, true},          // unknown option
		{"p:m:h", []string{"stray"}, nil, true},       // no positional arguments
		{"p:m:h", []string{"--", "stray"}, nil, true}, // not after -- either
		{"p:m:h", []string{"-m", "3", "--"}, tapOpts{'m': "3"}, false},
	} {
		got, err := getopt(c.spec, c.args)
		if (err != nil) != c.err {
			t.Errorf("getopt(%q, %q): err %v, want error %v", c.spec, c.args, err, c.err)
			continue
		}
		var ue *usageError
		if err != nil && !errors.As(err, &ue) {
			t.Errorf("getopt(%q, %q): %v is not a usage error", c.spec, c.args, err)
		}
		if err == nil && !reflect.DeepEqual(got, c.want) {
			t.Errorf("getopt(%q, %q) = %v, want %v", c.spec, c.args, got, c.want)
		}
	}
}

func TestTapCtlXenbusPath(t *testing.T) {
	for p, want := range map[string]reconciler.Key{
		"backend/vbd3/1/51712":                 {Kind: "vbd3", Domid: 1, Devid: 51712}, // libxl 4.20's form
		"/local/domain/0/backend/vbd3/7/51728": {Kind: "vbd3", Domid: 7, Devid: 51728},
		"/local/domain/0/backend/tap/0/768":    {Kind: "tap", Domid: 0, Devid: 768},
		"backend/vbd3/3/268439552/":            {Kind: "vbd3", Domid: 3, Devid: 1<<28 | 16<<8}, // xvdq
	} {
		got, err := keyFromXenbusPath(p)
		if err != nil || got != want {
			t.Errorf("keyFromXenbusPath(%q) = %v, %v; want %v", p, got, err, want)
		}
	}
	for _, p := range []string{
		"", "backend/vbd3/1", "backend/vif/1/0", "backend/vbd3/x/51712",
		"/local/domain/5/backend/vbd3/1/51712", // a driver domain's: not ours
		"backend/vbd3/32752/51712",             // DOMID_FIRST_RESERVED
		"device/vbd/51712/x",
	} {
		if k, err := keyFromXenbusPath(p); err == nil {
			t.Errorf("keyFromXenbusPath(%q) = %v, want an error", p, k)
		}
	}
}

func TestTapCtlMinor(t *testing.T) {
	for _, k := range []reconciler.Key{
		{Domid: 0, Devid: 51712}, {Domid: 1, Devid: 51712}, {Domid: 0x7fef, Devid: 1<<29 - 1},
		{Domid: 12, Devid: 1<<28 | 25<<8 | 3}, {Domid: 3, Devid: 768},
	} {
		m := tapMinor(k)
		dom, dev, ok := minorKey(m)
		if !ok || dom != k.Domid || dev != k.Devid {
			t.Errorf("minor %d of %d/%d decodes to %d/%d (%v)", m, k.Domid, k.Devid, dom, dev, ok)
		}
	}
	if m := tapMinor(reconciler.Key{Domid: 0, Devid: 51712}); m != 51712 {
		t.Errorf("domain 0's minor is its devid, got %d", m)
	}
	for _, m := range []int64{-1, 0x7ff0 << 29, 1 << 62} {
		if _, _, ok := minorKey(m); ok {
			t.Errorf("minor %d decoded", m)
		}
	}
}

func TestTapCtlExportSocket(t *testing.T) {
	for uri, want := range map[string]string{
		"nbd+unix:///?socket=/run/blktap/exports/d1.sock": "/run/blktap/exports/d1.sock",
		"nbd+unix:///xvda?socket=/s":                      "/s",
		"nbd://127.0.0.1:10809":                           "",
		"":                                                "",
	} {
		if got := exportSocket(uri); got != want {
			t.Errorf("exportSocket(%q) = %q, want %q", uri, got, want)
		}
	}
}

// tapCtlRun runs our tap-ctl link with env added to the test's.
func tapCtlRun(t *testing.T, link string, env []string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, link, args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		t.Fatalf("tap-ctl %v: %v", args, err)
	}
	return out.String(), errb.String(), code
}

// The commands a toolstack or an operator runs by hand, against a live
// daemon: list, stats, pause and unpause work on the disk; what cannot be
// emulated is refused in one line with a non-zero status.
// dialXenstore waits until the daemon answers and dials the xenstore it
// serves; it returns the socket and the client, closed when the test ends.
func (d *daemon) dialXenstore() (string, *xenstore.Client) {
	d.t.Helper()
	d.waitAnswering()
	sock := filepath.Join(d.stateDir, "xenstored.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	xs, err := xenstore.Dial(ctx, sock)
	if err != nil {
		d.t.Fatal(err)
	}
	d.t.Cleanup(func() { xs.Close() })
	return sock, xs
}

func TestTapCtlCommands(t *testing.T) {
	bin := buildBinary(t)
	link := filepath.Join(t.TempDir(), "tap-ctl")
	if err := os.Symlink(bin, link); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, bin, "")
	_, xs := d.dialXenstore()
	img := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	const domid, devid = 3, 51712
	be, _ := writeTapDisk(t, xs, domid, devid, "xvda", "aio:"+img)
	// A toolstack disk connects once its hotplug script has reported, as
	// block-tap does after `tap-ctl open` (that path is TestBlockTapAddRemove's).
	if err := xs.Write(context.Background(), be+"/hotplug-status", "connected"); err != nil {
		t.Fatal(err)
	}
	waitTapConnected(t, xs, be)
	pid, _ := xs.Read(context.Background(), be+"/blktap/worker-pid")
	minor := strconv.Itoa(domid<<29 | devid)
	c := &tapCtlUser{t: t, link: link, env: []string{"BLKTAP_STATE_DIR=" + d.stateDir, "XENBUS_PATH="}}
	c.list(pid, minor, img)
	c.statsPause(pid, minor)
	pid, _ = xs.Read(context.Background(), be+"/blktap/worker-pid")
	c.refusals(pid, minor, img)
	c.hotplugSequence(pid, minor, img)
	os.Remove(nbdLinkPath(pid, int64(domid<<29|devid))) // open's link, if root made one
}

func waitTapConnected(t *testing.T, xs *xenstore.Client, be string) {
	deadline := time.Now().Add(60 * time.Second)
	for {
		st, _ := xs.Read(context.Background(), be+"/state")
		ph, _ := xs.Read(context.Background(), be+"/blktap/phase")
		if st == "4" && ph == reconciler.PhaseConnected {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("disk not connected: state %q phase %q", st, ph)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// tapCtlUser runs the tap-ctl link with env, expecting success (ok) or an
// error (fails).
type tapCtlUser struct {
	t    *testing.T
	link string
	env  []string
}

func (c *tapCtlUser) ok(args ...string) string {
	c.t.Helper()
	out, errs, code := tapCtlRun(c.t, c.link, c.env, args...)
	if code != 0 {
		c.t.Fatalf("tap-ctl %v: exit %d: %s", args, code, errs)
	}
	return out
}

// fails: tap-ctl args exits with code and says want on stderr, in one
// line when code is 1, and nothing on stdout.
func (c *tapCtlUser) fails(code int, want string, extra []string, args ...string) {
	c.t.Helper()
	out, errs, got := tapCtlRun(c.t, c.link, append(append([]string{}, c.env...), extra...), args...)
	if got != code || !strings.Contains(errs, want) || out != "" {
		c.t.Fatalf("tap-ctl %v: exit %d, stdout %q, stderr %q; want exit %d and %q", args, got, out, errs, code, want)
	}
	if n := strings.Count(strings.TrimSpace(errs), "\n"); code == 1 && n != 0 {
		c.t.Fatalf("tap-ctl %v: %d lines of error, want one: %q", args, n+1, errs)
	}
}

// list: the disk is listed in tapdisk's format, with and without
// filters that match it, and not with filters that do not.
func (c *tapCtlUser) list(pid, minor, img string) {
	t := c.t
	line := fmt.Sprintf("pid=%s minor=%s state=0 args=aio:%s\n", pid, minor, img)
	if got := c.ok("list"); got != line {
		t.Fatalf("list: %q, want %q", got, line)
	}
	for _, f := range [][]string{{"-m", minor}, {"-p", pid}, {"-t", "raw"}, {"-f", img}} {
		if got := c.ok(append([]string{"list"}, f...)...); got != line {
			t.Fatalf("list %v: %q", f, got)
		}
	}
	for _, f := range [][]string{{"-m", "1"}, {"-t", "vhd"}, {"-f", img + "x"}} {
		if got := c.ok(append([]string{"list"}, f...)...); got != "" {
			t.Fatalf("list %v: %q, want nothing", f, got)
		}
	}
	// Inside the disk's own hotplug script, the disk is not listed yet.
	if out, errs, code := tapCtlRun(t, c.link, append(c.env, "XENBUS_PATH=backend/vbd3/3/51712"), "list"); code != 0 || out != "" {
		t.Fatalf("list under XENBUS_PATH: %d %q %q", code, out, errs)
	}
}

// statsPause: stats reports the disk; pause and unpause show in list.
func (c *tapCtlUser) statsPause(pid, minor string) {
	t := c.t
	var st struct {
		Minor int64           `json:"minor"`
		Pid   int             `json:"pid"`
		Stats json.RawMessage `json:"stats"`
	}
	if err := json.Unmarshal([]byte(c.ok("stats", "-p", pid, "-m", minor)), &st); err != nil || strconv.FormatInt(st.Minor, 10) != minor ||
		strconv.Itoa(st.Pid) != pid || len(st.Stats) == 0 {
		t.Fatalf("stats: %+v %v", st, err)
	}

	c.ok("pause", "-p", pid, "-m", minor)
	if got := c.ok("list", "-m", minor); !strings.Contains(got, " state=0x2 ") {
		t.Fatalf("list of a paused disk: %q", got)
	}
	c.ok("unpause", "-p", pid, "-m", minor)
	if got := c.ok("list", "-m", minor); !strings.Contains(got, " state=0 ") {
		t.Fatalf("list after unpause: %q", got)
	}
}

// refusals: what blktap-go does not do, and wrong arguments, fail with a
// clear message and the exit code tapdisk's tap-ctl uses.
func (c *tapCtlUser) refusals(pid, minor, img string) {
	hotplug := []string{"XENBUS_PATH=backend/vbd3/3/51712"}
	c.fails(1, "not supported by blktap-go", nil, "allocate")
	c.fails(1, "not supported by blktap-go", nil, "spawn")
	c.fails(1, "not supported by blktap-go", nil, "create", "-a", "aio:"+img)
	c.fails(1, "not supported by blktap-go", nil, "frobnicate")
	c.fails(1, "not supported by blktap-go", hotplug, "open", "-p", pid, "-m", minor, "-a", "aio:"+img, "-e", "4")
	c.fails(1, "still online", nil, "destroy", "-p", pid, "-m", minor)
	c.fails(1, "is not the minor of", hotplug, "open", "-p", pid, "-m", "5", "-a", "aio:"+img)
	c.fails(1, "is not the image xenstore declares", hotplug, "open", "-p", pid, "-m", minor, "-a", "vhd:"+img)
	c.fails(1, "serves no disk", nil, "attach", "-p", "1", "-m", minor)
	c.fails(1, "no such disk", nil, "stats", "-m", "7")
	c.fails(2, "usage: tap-ctl open", hotplug, "open", "-p", pid, "-m", minor)
	c.fails(2, "unknown option -x", nil, "list", "-x")
	c.fails(2, "usage: tap-ctl", nil)
}

// hotplugSequence: inside the hotplug script, the sequence block-tap runs
// succeeds.
func (c *tapCtlUser) hotplugSequence(pid, minor, img string) {
	t := c.t
	hotplug := []string{"XENBUS_PATH=backend/vbd3/3/51712"}
	// Inside the hotplug script, the sequence block-tap runs succeeds.
	if got, _, _ := tapCtlRun(t, c.link, append(c.env, hotplug...), "allocate"); got != "/run/blktap-control/tapdisk/tapdisk-"+minor+"\n" {
		t.Fatalf("allocate: %q", got)
	}
	if got, _, _ := tapCtlRun(t, c.link, append(c.env, hotplug...), "spawn"); got != pid+"\n" {
		t.Fatalf("spawn: %q, want the worker %s", got, pid)
	}
	for _, args := range [][]string{
		{"attach", "-p", pid, "-m", minor},
		{"open", "-p", pid, "-m", minor, "-a", "aio:" + img},
		{"detach", "-p", pid, "-m", minor},
		{"free", "-m", minor},
	} {
		if out, errs, code := tapCtlRun(t, c.link, append(c.env, hotplug...), args...); code != 0 {
			t.Fatalf("tap-ctl %v: %d %q %q", args, code, out, errs)
		}
	}
	// Releasing goes by the minor block-tap stored, whatever XENBUS_PATH
	// says (a stub domain's disk stores the shared disk's): a minor whose
	// disk is gone has nothing left to release.
	for _, args := range [][]string{{"destroy", "-p", pid, "-m", "7"}, {"free", "-m", "7"}, {"detach", "-p", pid, "-m", "7"}} {
		if out, errs, code := tapCtlRun(t, c.link, append(c.env, hotplug...), args...); code != 0 {
			t.Fatalf("tap-ctl %v: %d %q %q", args, code, out, errs)
		}
	}
}
