package reconciler

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats/nbd"
	"github.com/blktap-go/blktap/internal/ringfault"
	"github.com/blktap-go/blktap/xenstore"
)

// TestScenariosDaemon runs every transcript of testdata/scenarios against
// the real daemon (daemonHarness), where TestScenarios runs them against
// the Model: the same commands, played as a toolstack and a guest write
// xenstore, must give the same actions ("> ", those whose effect
// succeeded, in order) and the same states ("= ", backend and frontend
// states read from xenstore, what runs from the daemon's last pass). The
// Model's transcripts are the expectation; this test never rewrites them.
//
// Messages differ between the two (the Model's "corrupt image" is the
// worker's real error): each message-carrying command maps the daemon's
// message to the transcript's before lines are compared.
//
// Commands only this runner acts on (the Model ignores them):
//
//	fault xs-eagain N        the daemon's next N xenstore commits fail with EAGAIN
//	fault xs-delay DURATION  every xenstore reply to the daemon waits DURATION (0: none)
//	fault worker-slow DUR    this device's workers take DUR before answering the daemon
//	check [N] KEY=VALUE      device N's (default: this one's) backend KEY is VALUE (within 10 s)
//	check [N] starting       device N's first reconcile is still under way
//	check [N] worker-kept    device N's worker is the one before the last daemon-restart
//	check [N] io             through device N's export: write a new pattern, read back all so far
//	check [N] restart-wait=D device N's last worker restart waited D (Plan's backoff)
//	serve DURATION           the device's worker serves that long (the test sleeps)
//	daemon-restart           the daemon exits (its workers stay) and a new one starts
func TestScenariosDaemon(t *testing.T) {
	if testing.Short() {
		t.Skip("starts daemons and workers")
	}
	eachScenario(t, func(t *testing.T, _, in string) {
		r := &daemonRun{t: t}
		if got := r.run(strings.Split(in, "\n")); got != in+"\n" {
			t.Errorf("the daemon differs from the transcript:\n%s", lineDiff(in+"\n", got))
		}
	})
}

// daemonRun plays one transcript against a daemonHarness.
type daemonRun struct {
	t       *testing.T
	h       *daemonHarness
	devs    []Key
	cur     int                        // index in devs of the device commands address
	writes  []func(*xenstore.Tx) error // the guest's and toolstack's, committed at once
	mark    map[Key]int                // records already reported
	msgs    []msgPending               // messages to learn at the next converge
	subst   [][2]string                // the daemon's message -> the transcript's
	eagains int                        // injected EAGAINs the next converge must see used
	ios     map[Key]int                // patterns check io wrote on each device
	pids    map[Key]string             // worker pids at the last daemon-restart
	out     strings.Builder
}

// msgPending: the transcript's message for what the daemon will report
// in its own words, found by find in the records of a converge.
type msgPending struct {
	msg  string
	find func(harnessRecord) string
}

func (r *daemonRun) run(lines []string) string {
	r.mark = map[Key]int{}
	for n, line := range lines {
		if strings.HasPrefix(line, "> ") || strings.HasPrefix(line, "= ") || strings.HasPrefix(line, "! ") {
			continue
		}
		r.out.WriteString(line + "\n")
		f := strings.Fields(line)
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		if err := r.command(f[0], strings.Join(f[1:], " ")); err != nil {
			r.t.Fatalf("line %d %q: %v\n--- the daemon's transcript so far:\n%s", n+1, line, err, r.out.String())
		}
	}
	return r.out.String()
}

func (r *daemonRun) key() Key { return r.devs[r.cur] }

func (r *daemonRun) command(cmd, arg string) error {
	if cmd != "start" && cmd != "daemon-restart" && len(r.devs) == 0 {
		return fmt.Errorf("no device yet")
	}
	switch cmd {
	case "start":
		return r.start(arg)
	case "converge":
		return r.converge()
	case "device":
		n, err := strconv.Atoi(arg)
		if err != nil || n < 1 || n > len(r.devs) {
			return fmt.Errorf("no device %q", arg)
		}
		r.cur = n - 1
		return nil
	case "worker-dies":
		return r.workerDies()
	case "ring-hostile", "frontend-gives-up":
		return r.breakRing(cmd, arg)
	case "fault":
		return r.fault(arg)
	case "serve":
		return r.serve(arg)
	case "check":
		return r.check(arg)
	case "daemon-restart":
		r.flush()
		r.pids = map[Key]string{}
		for _, k := range r.devs {
			r.pids[k] = r.h.read(k.BackendPath(0) + "/" + keyWorkerPid)
		}
		r.h.restart()
		return nil
	}
	return r.xenstoreCommand(cmd, arg)
}

// xenstoreCommand queues what a toolstack or guest command writes.
func (r *daemonRun) xenstoreCommand(cmd, arg string) error {
	k := r.key()
	be, fe := k.BackendPath(0), k.FrontendPath()
	switch cmd {
	case "frontend":
		st, ok := frontendStates[arg]
		if !ok {
			return fmt.Errorf("frontend %q", arg)
		}
		r.write(fe+"/state", strconv.Itoa(int(st)))
	case "ring-published":
		if !r.h.xen {
			return fmt.Errorf("ring-published: the local frontend publishes its own ring")
		}
		// As Linux blkfront (talk_to_blkback): one page, one channel.
		r.write(fe+"/ring-ref", "8", fe+"/event-channel", "5", fe+"/protocol", "x86_64-abi")
	case "detach":
		r.write(be+"/online", "0", be+"/state", strconv.Itoa(int(StateClosing)))
	case "remove":
		r.rm(be, fe)
	case "hotplug-connected":
		r.write(be+"/hotplug-status", "connected")
	case "frontend-gone":
		r.rm(fe)
	case "frontend-error":
		// ring-ref0 that is no number, under ring-page-order.
		r.write(fe+"/ring-page-order", "1", fe+"/ring-ref0", "x")
		r.learn(arg, func(rec harnessRecord) string {
			if rec.o != nil {
				return rec.o.FrontendError
			}
			return ""
		})
	case "cdrom":
		r.write(be+"/device-type", "cdrom")
	case "params":
		r.write(be+"/params", r.params(arg))
	case "fail-start":
		// An image that is not there: a terminal error for these params.
		r.write(be+"/params", "aio:"+filepath.Join(r.h.dir, fmt.Sprintf("missing%d.raw", r.cur+1)))
		r.learn(arg, func(rec harnessRecord) string { return rec.a.Failed })
	default:
		return fmt.Errorf("unknown command %q", cmd)
	}
	return nil
}

// params maps a transcript's params (FORMAT:/PATH) to an image under the
// state directory, made if missing.
func (r *daemonRun) params(arg string) string {
	format, p, ok := strings.Cut(arg, ":")
	if !ok || p == "" {
		return arg
	}
	return format + ":" + r.h.image(strings.TrimPrefix(p, "/"))
}

func (r *daemonRun) write(kv ...string) {
	r.writes = append(r.writes, func(tx *xenstore.Tx) error {
		for i := 0; i+1 < len(kv); i += 2 {
			if err := tx.Write(context.Background(), kv[i], kv[i+1]); err != nil {
				return err
			}
		}
		return nil
	})
}

func (r *daemonRun) rm(paths ...string) {
	r.writes = append(r.writes, func(tx *xenstore.Tx) error {
		for _, p := range paths {
			if err := tx.Rm(context.Background(), p); err != nil && !isNotFound(err) {
				return err
			}
		}
		return nil
	})
}

// flush commits the queued writes in one transaction, as the Model takes
// every command before a converge as one change.
func (r *daemonRun) flush() {
	if len(r.writes) == 0 {
		return
	}
	ws := r.writes
	r.writes = nil
	err := r.h.xs.Transaction(context.Background(), func(tx *xenstore.Tx) error {
		for _, w := range ws {
			if err := w(tx); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		r.t.Fatalf("xenstore: %v", err)
	}
}

func (r *daemonRun) learn(msg string, find func(harnessRecord) string) {
	r.msgs = append(r.msgs, msgPending{msg: msg, find: find})
}

// start declares a new device, as the Model's start does, at the next
// free virtual device: earlier devices stay as they are.
func (r *daemonRun) start(kind string) error {
	xenMode := strings.HasPrefix(kind, "xen-")
	if r.h == nil {
		r.h = newDaemonHarness(r.t, xenMode)
	} else if r.h.xen != xenMode {
		return fmt.Errorf("start %s: this transcript's daemon runs in the other mode", kind)
	}
	r.flush()
	n := len(r.devs) + 1
	k := Key{Kind: KindVBD3, Domid: 3, Devid: uint32(51712 + 16*n)}
	if kind == "domain0" {
		k.Domid = 0
	}
	r.devs, r.cur = append(r.devs, k), n-1
	be, fe := k.BackendPath(0), k.FrontendPath()
	img := r.h.image(fmt.Sprintf("d%d.raw", n))
	kv := []string{be + "/frontend", fe, be + "/frontend-id", strconv.Itoa(int(k.Domid)), be + "/online", "1",
		be + "/removable", "0", be + "/bootable", "1", be + "/dev", fmt.Sprintf("xvd%c", 'a'+n), be + "/type", k.Kind,
		be + "/mode", "w", be + "/device-type", "disk", be + "/discard-enable", "1", be + "/specification", "xen",
		be + "/params", "aio:" + img, be + "/state", "1",
		fe + "/backend", be, fe + "/backend-id", "0", fe + "/virtual-device", strconv.Itoa(int(k.Devid)),
		fe + "/device-type", "disk", fe + "/state", "1"}
	switch kind {
	case "domain0", "guest", "xen-guest":
	case "xen-libxl":
		kv = append(kv, be+"/script", "/etc/xen/scripts/block-tap")
	case "xen-attach":
		kv = append(kv, be+"/script", "/etc/xen/scripts/block-tap", be+"/"+keySource, "attach")
	default:
		return fmt.Errorf("start %q", kind)
	}
	r.write(kv...)
	return nil
}

// converge commits the queued writes, waits for the daemon to settle the
// device and reports what it did since the last report.
func (r *daemonRun) converge() error {
	r.flush()
	k := r.key()
	last, err := r.h.converge(k, time.Minute)
	if err != nil {
		rs, _ := r.h.records(k, r.mark[k])
		rs = rs[max(0, len(rs)-40):] // a device that loops repeats itself
		for _, rec := range rs {
			if rec.act != nil {
				fmt.Fprintf(&r.out, "> %s (%v)\n", rec.act, rec.err)
			}
		}
		return err
	}
	rs, n := r.h.records(k, r.mark[k])
	r.mark[k] = n
	for _, m := range r.msgs {
		for _, rec := range rs {
			if real := m.find(rec); real != "" {
				r.subst = append(r.subst, [2]string{real, m.msg})
				break
			}
		}
	}
	r.msgs = nil
	for _, rec := range rs {
		// As the Model: effects that did their part, and those that
		// failed for good; not the attempts retried.
		if rec.act != nil && (rec.err == nil || isTerminal(rec.err)) {
			r.out.WriteString(r.words("> " + rec.act.String() + "\n"))
		}
	}
	r.out.WriteString(r.words("= " + r.h.stateLine(k, last.a) + "\n"))
	// The status lags when its write was refused (an EAGAIN storm):
	// a retry (statusRetry) writes it.
	bad := r.h.statusMismatch(k, last.a)
	for deadline := time.Now().Add(10 * time.Second); bad != "" && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
		bad = r.h.statusMismatch(k, last.a)
	}
	if bad != "" {
		fmt.Fprintf(&r.out, "! status: %s\n", bad)
	}
	if r.eagains > 0 {
		left, injected := r.h.proxy.pending()
		retried := 0
		for _, rec := range rs {
			if rec.err != nil && !isTerminal(rec.err) {
				retried++
			}
		}
		r.t.Logf("%s: %d EAGAINs injected in all; %d steps or passes failed and were retried", k, injected, retried)
		if left > 0 {
			fmt.Fprintf(&r.out, "! fault: %d of %d EAGAINs never injected\n", left, r.eagains)
		}
		r.eagains = 0
	}
	return nil
}

// words puts the transcript's messages in place of the daemon's.
func (r *daemonRun) words(s string) string {
	for _, p := range r.subst {
		s = strings.ReplaceAll(s, p[0], p[1])
	}
	return workerExited.ReplaceAllString(s, "(worker exited)")
}

// workerExited is how the daemon says why a worker exited (its pid, its
// exit status), which the transcripts write as "(worker exited)".
var workerExited = regexp.MustCompile(`(?m)\(worker \d+ exited: .*\)$`)

// workerDies kills the device's worker and waits until the daemon has
// noticed (its restart count went up).
func (r *daemonRun) workerDies() error {
	r.flush()
	k := r.key()
	be := k.BackendPath(0)
	pid, err := strconv.Atoi(r.h.read(be + "/" + keyWorkerPid))
	if err != nil || pid <= 0 {
		return fmt.Errorf("no worker pid (%v): a kill of 0 or less would signal a process group", err)
	}
	restarts := r.h.read(be + "/" + keyRestarts)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		return err
	}
	deadline := time.Now().Add(30 * time.Second)
	for r.h.read(be+"/"+keyRestarts) == restarts {
		if time.Now().After(deadline) {
			return fmt.Errorf("the daemon never noticed worker %d died", pid)
		}
		r.h.d.q.Add(k)
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}

// breakRing breaks the device's local ring from outside, as a hostile
// peer would (internal/ringfault), and waits until the daemon has seen it.
func (r *daemonRun) breakRing(cmd, msg string) error {
	r.flush()
	if r.h.xen {
		return fmt.Errorf("%s: only local rings can be broken here", cmd)
	}
	idx := ringfault.Requests // the frontend's producer runs ahead: the worker stops the ring
	if cmd == "frontend-gives-up" {
		idx = ringfault.Responses // responses never asked for: the local frontend gives up
	}
	k := r.key()
	_, from := r.h.records(k, 0)
	if n, err := ringfault.BreakRings(os.Getpid(), idx); err != nil || n < 1 {
		return fmt.Errorf("break rings: %d broken, %v", n, err)
	}
	r.learn(msg, func(rec harnessRecord) string { return cmp.Or(rec.a.RingError, rec.a.RingLost) })
	return r.h.await(k, from, "the broken ring", func(rec harnessRecord) bool {
		return rec.passEnd && (rec.a.RingError != "" || rec.a.RingLost != "")
	})
}

func (r *daemonRun) fault(arg string) error {
	what, val, _ := strings.Cut(arg, " ")
	switch what {
	case "xs-eagain":
		n, err := strconv.Atoi(val)
		if err != nil {
			return err
		}
		r.h.proxy.failCommits(n)
		r.eagains += n
	case "xs-delay":
		d, err := time.ParseDuration(val)
		if err != nil {
			return err
		}
		r.h.proxy.setDelay(d)
	case "worker-slow":
		if _, err := time.ParseDuration(val); err != nil {
			return err
		}
		k := r.key()
		name := fmt.Sprintf("d%d-%d", k.Domid, k.Devid)
		env := os.Getenv(envWorkerDelay)
		if env != "" {
			env += ","
		}
		r.t.Setenv(envWorkerDelay, env+name+"="+val)
	default:
		return fmt.Errorf("unknown fault %q", what)
	}
	return nil
}

// check compares a backend key of a device with a value, waiting up to
// 10 s for it (status keys lag a pass whose write was refused); or, for
// "starting", checks the device's first reconcile is still under way.
func (r *daemonRun) check(arg string) error {
	k := r.key()
	if n, rest, ok := strings.Cut(arg, " "); ok {
		i, err := strconv.Atoi(n)
		if err != nil || i < 1 || i > len(r.devs) {
			return fmt.Errorf("no device %q", n)
		}
		k, arg = r.devs[i-1], rest
	}
	if arg == "io" {
		if err := r.checkIO(k); err != nil {
			fmt.Fprintf(&r.out, "! %s io: %v\n", k, err)
		}
		return nil
	}
	if arg == "worker-kept" {
		if got := r.h.read(k.BackendPath(0) + "/" + keyWorkerPid); got == "" || got != r.pids[k] {
			fmt.Fprintf(&r.out, "! %s worker %q, was %q before the restart\n", k, got, r.pids[k])
		}
		return nil
	}
	if arg == "starting" {
		rs, _ := r.h.records(k, 0)
		if _, ended := lastPass(rs); ended || !r.h.busy(k) {
			fmt.Fprintf(&r.out, "! %s is not starting: a pass ended %v, queued or reconciled %v\n", k, ended, r.h.busy(k))
		}
		return nil
	}
	key, want, ok := strings.Cut(arg, "=")
	if !ok {
		return fmt.Errorf("check %q: want KEY=VALUE or starting", arg)
	}
	if key == "restart-wait" {
		return r.checkRestartWait(k, want)
	}
	got := ""
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if got = r.h.read(k.BackendPath(0) + "/" + key); got == want || time.Now().After(deadline) {
			break
		}
	}
	if got != want {
		fmt.Fprintf(&r.out, "! %s %s = %q\n", k, key, got)
	}
	return nil
}

// checkIO writes a pattern of its own at the device's next 64 KiB through
// its export (a local guest's guest view, which goes through the ring; the
// NBD export otherwise), flushes, and reads back every pattern written so
// far: what was acknowledged before a worker died is there after.
func (r *daemonRun) checkIO(k Key) error {
	uri := r.h.read(k.BackendPath(0) + "/" + keyExport)
	if uri == "" {
		return fmt.Errorf("no export")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	img, err := nbd.OpenContext(ctx, uri, nbd.Options{})
	if err != nil {
		return err
	}
	defer img.Close()
	if r.ios == nil {
		r.ios = map[Key]int{}
	}
	const chunk = 64 << 10
	n := r.ios[k]
	if _, err := img.WriteAt(bytes.Repeat([]byte{byte(0x41 + n)}, chunk), int64(n)*chunk); err != nil {
		return err
	}
	if err := img.Flush(); err != nil {
		return err
	}
	r.ios[k] = n + 1
	buf := make([]byte, chunk)
	for i := 0; i <= n; i++ {
		if _, err := img.ReadAt(buf, int64(i)*chunk); err != nil {
			return err
		}
		if want := bytes.Repeat([]byte{byte(0x41 + i)}, chunk); !bytes.Equal(buf, want) {
			return fmt.Errorf("pattern %d at %d KiB lost", i, i*chunk>>10)
		}
	}
	return nil
}

func isNotFound(err error) bool { return errors.Is(err, xenstore.ErrNotFound) }

// lineDiff shows two transcripts line by line, marking the lines that
// differ.
func lineDiff(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	var b strings.Builder
	for i := 0; i < max(len(w), len(g)); i++ {
		var wl, gl string
		if i < len(w) {
			wl = w[i]
		}
		if i < len(g) {
			gl = g[i]
		}
		if wl == gl {
			fmt.Fprintf(&b, "    %s\n", wl)
		} else {
			fmt.Fprintf(&b, "  - %s\n  + %s\n", wl, gl)
		}
	}
	return b.String()
}
