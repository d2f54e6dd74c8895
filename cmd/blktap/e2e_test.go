package main

// End-to-end: the daemon on the embedded default (embedded xenstored, local
// frontend, NBD exports) checked with programs no one here wrote. This is
// the walking skeleton's acceptance (issue 3).

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/oracle"
)

// buildBinary builds cmd/blktap once per test binary run.
func buildBinary(t testing.TB) string {
	t.Helper()
	return buildPair(t)
}

// buildPair builds blktap and its worker binary as make build does
// (scripts/build.sh), so the daemons under test run their workers from
// blktap-worker; the go build flags are passed on (tags).
func buildPair(t testing.TB, flags ...string) string {
	t.Helper()
	dir := t.TempDir()
	out, err := exec.Command("../../scripts/build.sh", append([]string{dir}, flags...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("scripts/build.sh %v: %v\n%s", flags, err, out)
	}
	return filepath.Join(dir, "blktap")
}

type daemon struct {
	t        testing.TB
	bin      string
	stateDir string
	cmd      *exec.Cmd
	logPath  string        // the daemon's log file
	done     chan error    // its exit status, for the test to read
	gone     chan struct{} // closed when it has exited
}

// startDaemon starts `blktap run` with config on a fresh state directory.
func startDaemon(t testing.TB, bin, config string, runFlags ...string) *daemon {
	t.Helper()
	state, err := os.MkdirTemp("", "bt-state-") // short: unix socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(state) })
	return spawnDaemon(t, bin, state, nil, append([]string{"-c", config}, runFlags...)...)
}

// idleDaemon builds the binary and starts a daemon with no disks
// configured, answering its API; dir is for the test's images.
func idleDaemon(t *testing.T) (bin, dir string, d *daemon) {
	t.Helper()
	bin = buildBinary(t)
	dir = t.TempDir() // before the daemon: removed after it has stopped
	d = startDaemon(t, bin, "")
	d.waitAnswering()
	return bin, dir, d
}

// spawnDaemon is every test daemon's start: `blktap run` on stateDir with
// args (and env added to the test's), its output in a log file shown if
// the test fails, stopped with `blktap shutdown` at the end unless it
// has exited.
func spawnDaemon(t testing.TB, bin, stateDir string, env []string, args ...string) *daemon {
	t.Helper()
	logf, err := os.Create(filepath.Join(t.TempDir(), "daemon.log"))
	if err != nil {
		t.Fatal(err)
	}
	// Test images live in t.TempDir(), under the system's temp directory.
	cmd := exec.Command(bin, append([]string{"run", "--state-dir", stateDir, "--image-dir", os.TempDir()}, args...)...)
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d := &daemon{t: t, bin: bin, stateDir: stateDir, cmd: cmd, logPath: logf.Name(),
		done: make(chan error, 1), gone: make(chan struct{})}
	exited := make(chan error, 1) // the cleanup's copy: the test may have read done
	go func() {
		err := cmd.Wait()
		close(d.gone)
		exited <- err
		d.done <- err
	}()
	t.Cleanup(func() {
		select {
		case <-d.gone:
		default:
			stopDaemon(t, bin, stateDir, cmd, exited)
		}
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("daemon log (%s):\n%s", logf.Name(), b)
		}
	})
	return d
}

// stopDaemon ends a test's daemon as a host shutdown does, with `blktap
// shutdown` (every disk closed, no worker left running; a SIGTERM would
// leave them serving), else kills it.
func stopDaemon(t testing.TB, bin, stateDir string, cmd *exec.Cmd, done <-chan error) {
	out, err := exec.Command(bin, "shutdown", "--state-dir", stateDir, "--timeout", "60s").CombinedOutput()
	if err != nil {
		t.Errorf("blktap shutdown: %v\n%s", err, out)
		cmd.Process.Kill()
	}
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Errorf("daemon still running after blktap shutdown")
		cmd.Process.Kill()
	}
}

func (d *daemon) blktap(args ...string) (string, error) {
	args = append(args, "--state-dir", d.stateDir)
	out, err := exec.Command(d.bin, args...).Output()
	if ee, ok := err.(*exec.ExitError); ok {
		return string(out), fmt.Errorf("blktap %s: %v: %s", strings.Join(args, " "), err, ee.Stderr)
	}
	return string(out), err
}

type lsRow struct {
	Name      string `json:"name"`
	Domain    uint32 `json:"domain"`
	Devid     uint32 `json:"devid"`
	State     int    `json:"state"`
	Frontend  int    `json:"frontend_state"`
	Phase     string `json:"phase"`
	Error     string `json:"error"`
	Export    string `json:"export"`
	WorkerPid int    `json:"worker_pid"`
	Image     string `json:"image"`
}

// waitConnected polls `blktap ls --json` until every named disk is connected.
func (d *daemon) waitConnected(names ...string) map[string]lsRow {
	d.t.Helper()
	return d.waitConnectedWithin(60*time.Second, names...)
}

func (d *daemon) waitConnectedWithin(limit time.Duration, names ...string) map[string]lsRow {
	d.t.Helper()
	deadline := time.Now().Add(limit)
	var last string
	for time.Now().Before(deadline) {
		select {
		case err := <-d.done:
			d.t.Fatalf("daemon exited: %v", err)
		default:
		}
		out, err := d.blktap("ls", "--json")
		if err == nil {
			var rows []lsRow
			if err := json.Unmarshal([]byte(out), &rows); err != nil {
				d.t.Fatalf("ls --json: %v\n%s", err, out)
			}
			got := map[string]lsRow{}
			for _, r := range rows {
				if r.Phase == "connected" && r.State == 4 && r.Export != "" {
					got[r.Name] = r
				}
			}
			all := true
			for _, n := range names {
				if _, ok := got[n]; !ok {
					all = false
				}
			}
			if all {
				return got
			}
			last = out
		} else {
			last = err.Error()
		}
		time.Sleep(200 * time.Millisecond)
	}
	d.t.Fatalf("disks %v not connected in time; last ls:\n%s", names, last)
	return nil
}

func runTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

const e2eSize = 256 << 20

func TestEndToEndWalkingSkeleton(t *testing.T) {
	qemuIO := oracle.Require(t, "qemu-io")
	qemuImg := oracle.Require(t, "qemu-img")
	nbdinfo := oracle.Require(t, "nbdinfo")
	fio := oracle.Require(t, "fio")
	xsls := oracle.Require(t, "xenstore-ls")

	bin := buildBinary(t)
	imgDir := t.TempDir()
	cfg := filepath.Join(imgDir, "disks.yaml")
	yaml := fmt.Sprintf(`disks:
  - name: dom0disk
    image: %[1]s/dom0.raw
    format: raw
    mode: w
    domain: 0
    device: xvdb
    create: {size: 256M}
  - name: guestdisk
    image: %[1]s/guest.raw
    format: aio
    mode: w
    domain: 1
    device: xvdb
    create: {size: 256M}
`, imgDir)
	if err := os.WriteFile(cfg, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, bin, cfg)
	rows := d.waitConnected("dom0disk", "guestdisk")
	files := map[string]string{"dom0disk": imgDir + "/dom0.raw", "guestdisk": imgDir + "/guest.raw"}

	for _, name := range []string{"dom0disk", "guestdisk"} {
		t.Run(name, func(t *testing.T) {
			uri := rows[name].Export
			if !strings.HasPrefix(uri, "nbd+unix:///?socket=") {
				t.Fatalf("export %q is not an nbd+unix URI", uri)
			}
			skeletonQemuIO(t, qemuIO, uri, files[name])
			skeletonNbdinfo(t, nbdinfo, uri)
			runTool(t, qemuImg, "compare", "-f", "raw", "-F", "raw", uri, files[name])
			skeletonFio(t, fio, name, uri)
		})
	}
	skeletonXenstore(t, xsls, d, rows)
	pids := skeletonSigterm(t, d, rows, qemuIO)
	skeletonAdoptShutdown(t, bin, d, cfg, files, pids)
}

// skeletonQemuIO: a pattern written through NBD lands in the image file,
// reads back, and a wrong pattern fails verification.
func skeletonQemuIO(t *testing.T, qemuIO, uri, file string) {
	out := runTool(t, qemuIO, "-f", "raw", uri, "-c", "write -P 0xa5 1M 4M")
	if !strings.Contains(out, "wrote 4194304/4194304 bytes") {
		t.Fatalf("qemu-io write: %s", out)
	}
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(b)) != e2eSize {
		t.Fatalf("image file is %d bytes, want %d", len(b), e2eSize)
	}
	for i, c := range b[1<<20 : 5<<20] {
		if c != 0xa5 {
			t.Fatalf("image byte %d = %#x, want 0xa5", (1<<20)+i, c)
		}
	}
	if b[(1<<20)-1] != 0 || b[5<<20] != 0 {
		t.Fatalf("write spilled outside 1M..5M")
	}
	out = runTool(t, qemuIO, "-f", "raw", uri, "-c", "read -P 0xa5 1M 4M")
	if strings.Contains(out, "verification failed") || !strings.Contains(out, "read 4194304/4194304 bytes") {
		t.Fatalf("qemu-io read: %s", out)
	}
	// A pattern that is not there must fail verification: the check can fail.
	bad, _ := exec.Command(qemuIO, "-f", "raw", uri, "-c", "read -P 0x5a 1M 4K").CombinedOutput()
	if !strings.Contains(string(bad), "verification failed") {
		t.Fatalf("qemu-io accepted a wrong pattern: %s", bad)
	}
}

// skeletonNbdinfo: nbdinfo reports the declared size.
func skeletonNbdinfo(t *testing.T, nbdinfo, uri string) {
	var info struct {
		Exports []struct {
			Size int64 `json:"export-size"`
		} `json:"exports"`
	}
	out := runTool(t, nbdinfo, "--json", uri)
	if err := json.Unmarshal([]byte(out), &info); err != nil || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo --json: %v\n%s", err, out)
	}
	if info.Exports[0].Size != e2eSize {
		t.Fatalf("nbdinfo size %d, want %d", info.Exports[0].Size, e2eSize)
	}
}

// skeletonFio: fio through the export, random 4k read/write with
// verification.
func skeletonFio(t *testing.T, fio, name, uri string) {
	out := runTool(t, fio, "--name=e2e", "--ioengine=nbd", "--uri="+uri,
		"--rw=randrw", "--rwmixread=50", "--bs=4k", "--iodepth=32", "--size=64M",
		"--time_based", "--runtime=20", "--verify=crc32c", "--verify_backlog=1024",
		"--verify_fatal=1", "--verify_state_save=0", "--output-format=json")
	var res struct {
		Jobs []struct {
			Error int `json:"error"`
			Read  struct {
				IOPS float64 `json:"iops"`
			} `json:"read"`
			Write struct {
				IOPS float64 `json:"iops"`
			} `json:"write"`
		} `json:"jobs"`
	}
	js := out[strings.Index(out, "{"):]
	if err := json.Unmarshal([]byte(js), &res); err != nil || len(res.Jobs) != 1 {
		t.Fatalf("fio output: %v\n%s", err, out)
	}
	if res.Jobs[0].Error != 0 {
		t.Fatalf("fio error %d:\n%s", res.Jobs[0].Error, out)
	}
	if res.Jobs[0].Write.IOPS == 0 || res.Jobs[0].Read.IOPS == 0 {
		t.Fatalf("fio did no I/O:\n%s", out)
	}
	t.Logf("fio 4k randrw QD32 verify=crc32c via %s: read %.0f IOPS, write %.0f IOPS", name, res.Jobs[0].Read.IOPS, res.Jobs[0].Write.IOPS)
}

// skeletonXenstore: Xen's own xenstore-ls on the embedded xenstored shows
// both disks connected and the dom0 one naming its export.
func skeletonXenstore(t *testing.T, xsls string, d *daemon, rows map[string]lsRow) {
	cmd := exec.Command(xsls, "-f", "/local/domain")
	cmd.Env = append(os.Environ(), "XENSTORED_PATH="+filepath.Join(d.stateDir, "xenstored.sock"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("xenstore-ls: %v\n%s", err, out)
	}
	tree := string(out)
	want := []string{
		`/local/domain/0/backend/vbd3/0/51728/state = "4"`,
		`/local/domain/0/backend/vbd3/1/51728/state = "4"`,
		`/local/domain/1/device/vbd/51728/state = "4"`,
		`/local/domain/0/backend/vbd3/0/51728/hotplug-status = "connected"`,
	}
	for _, w := range want {
		if !strings.Contains(tree, w) {
			t.Errorf("xenstore-ls lacks %s", w)
		}
	}
	re := regexp.MustCompile(`/local/domain/0/backend/vbd3/0/51728/physical-device-path = "([^"]+)"`)
	m := re.FindStringSubmatch(tree)
	if m == nil || !strings.HasSuffix(rows["dom0disk"].Export, "socket="+m[1]) {
		t.Errorf("dom0 physical-device-path %v does not name the export %s", m, rows["dom0disk"].Export)
	}
	if t.Failed() {
		t.Logf("xenstore-ls:\n%s", tree)
	}
}

// skeletonSigterm: on SIGTERM (systemctl stop or restart) the daemon exits
// 0 and every worker keeps serving its disk; it returns their pids.
func skeletonSigterm(t *testing.T, d *daemon, rows map[string]lsRow, qemuIO string) []int {
	// worker keeps serving its disk.
	pids := []int{rows["dom0disk"].WorkerPid, rows["guestdisk"].WorkerPid}
	d.cmd.Process.Signal(syscall.SIGTERM)
	d.waitExit(30*time.Second, "SIGTERM")
	for _, pid := range pids {
		if pid <= 0 {
			t.Fatalf("no worker pid in ls")
		}
		if err := syscall.Kill(pid, 0); err != nil {
			t.Errorf("worker %d gone after SIGTERM to the daemon: %v", pid, err)
		}
	}
	t.Cleanup(func() {
		// Should the test stop before a daemon adopts them.
		for _, pid := range pids {
			if !processGone(pid) {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	// Still served, with no daemon (fio wrote below 64M).
	runTool(t, qemuIO, "-f", "raw", rows["dom0disk"].Export, "-c", "write -P 0x3c 128M 1M", "-c", "read -P 0x3c 128M 1M")

	return pids
}

// skeletonAdoptShutdown: the next daemon adopts the workers; `blktap
// shutdown` flushes and closes every disk, stops the workers and the daemon.
func skeletonAdoptShutdown(t *testing.T, bin string, d *daemon, cfg string, files map[string]string, pids []int) {
	// every disk, stops the workers and the daemon.
	d2 := restartDaemon(t, d, cfg)
	rows2 := d2.waitConnected("dom0disk", "guestdisk")
	if rows2["dom0disk"].WorkerPid != pids[0] {
		t.Errorf("dom0disk: worker %d replaced by %d; want it adopted", pids[0], rows2["dom0disk"].WorkerPid)
	}
	out, err := exec.Command(bin, "shutdown", "--state-dir", d.stateDir).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "closed 2 disks") {
		t.Fatalf("blktap shutdown: %v\n%s", err, out)
	}
	// Flushed and closed: the image file holds what was written.
	if b, err := os.ReadFile(files["dom0disk"]); err != nil || len(b) < 129<<20 || b[128<<20] != 0x3c || b[129<<20-1] != 0x3c {
		t.Fatalf("dom0 image after shutdown: %v", err)
	}
	// shutdown returned once the daemon had exited (here, a zombie until
	// the test reaps it).
	d2.waitExit(5*time.Second, "blktap shutdown returned")
	for _, pid := range []int{rows2["dom0disk"].WorkerPid, rows2["guestdisk"].WorkerPid} {
		if !processGone(pid) {
			t.Errorf("worker %d still running after blktap shutdown", pid)
		}
	}
	if _, err := exec.Command(bin, "shutdown", "--state-dir", d.stateDir).CombinedOutput(); err == nil {
		t.Error("blktap shutdown with no daemon running succeeded")
	}
}

// waitAPI waits until the daemon's API socket accepts a connection, or
// the daemon is gone.
func waitAPI(t testing.TB, sock string, gone <-chan struct{}) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return
		}
		select {
		case <-gone:
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatalf("the restarted daemon's API (%s) did not answer in 90 s", sock)
}

// waitExit fails the test unless the daemon exits 0 within limit of
// after, what should have ended it.
func (d *daemon) waitExit(limit time.Duration, after string) {
	d.t.Helper()
	select {
	case err := <-d.done:
		if err != nil {
			d.t.Fatalf("daemon exit after %s: %v", after, err)
		}
	case <-time.After(limit):
		d.t.Fatalf("daemon still running %v after %s", limit, after)
	}
}

// restartDaemon starts a new daemon on d's state directory (with extra
// arguments and environment), stopped with `blktap shutdown` at the end.
func restartDaemon(t testing.TB, d *daemon, config string, env ...string) *daemon {
	t.Helper()
	var args []string
	if config != "" {
		args = []string{"-c", config}
	}
	d2 := spawnDaemon(t, d.bin, d.stateDir, env, args...)
	// The restored xenstore tree says "connected" before the new daemon
	// has adopted the workers; its API socket comes after adoption, so
	// wait for it (or for the daemon to exit, which the caller sees).
	waitAPI(t, filepath.Join(d.stateDir, "blktap.sock"), d2.gone)
	return d2
}

// fioResult is how one background fio run ended.
type fioResult struct {
	name string
	out  string
	err  error
}

// startFioVerify starts fio writing random 4k blocks with crc32c verify
// through uri, rate-limited so it is still running when the test strikes,
// and reports on results when it ends.
func startFioVerify(t testing.TB, fio, name, uri, size string, iops int, results chan<- fioResult) {
	t.Helper()
	cmd := exec.Command(fio, "--name="+name, "--ioengine=nbd", "--uri="+uri,
		"--rw=randwrite", "--bs=4k", "--iodepth=8", "--size="+size, fmt.Sprintf("--rate_iops=%d", iops),
		"--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		err := cmd.Wait()
		results <- fioResult{name, out.String(), err}
	}()
}
