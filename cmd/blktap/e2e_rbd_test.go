//go:build rbd

package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/cephdev"
	"github.com/blktap-go/blktap/internal/crashtest"
	"github.com/blktap-go/blktap/internal/oracle"
)

// buildRBDBinary builds blktap and its worker with the rbd format.
func buildRBDBinary(t testing.TB) string {
	t.Helper()
	return buildPair(t, "-tags", "rbd pacific")
}

// TestEndToEndRBDHandoff plays two hosts (two daemons with their own state
// directories) declaring one rbd image writable: the second is refused,
// naming the first, until the first pauses the disk (live migration's
// handoff) in the middle of a fio run; then the second serves every write
// fio saw acknowledged, and the first can no longer take the image back.
func TestEndToEndRBDHandoff(t *testing.T) {
	h := startHandoff(t)
	a, b := h.a, h.b
	qemuIO := oracle.Require(t, "qemu-io")
	start := time.Now()
	if out, err := a.blktap("pause", "0", "xvdb"); err != nil {
		t.Fatalf("pause on the first host: %v %s", err, out)
	}
	// What fio counts as written from here on is all the paused disk
	// acknowledged; what it has in flight is held, never written. Its
	// trigger file saves exactly that (the completed writes, and the
	// in-flight ones to leave out) for the verification on B.
	h.saveState(t)
	written := a.counters("vm1").IO.NBDWrites
	rowB := b.waitConnectedWithin(90*time.Second, "vm1")["vm1"]
	t.Logf("second host serves the image %v after the first paused, under fio (%d writes through the first)",
		time.Since(start).Round(100*time.Millisecond), written)
	out := runTool(t, qemuIO, "-f", "raw", "-c", "read -P 0x61 0 1M", "-c", "write -P 0x62 1M 4k", rowB.Export)
	if strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("the second host reads other data:\n%s", out)
	}
	h.verify(t, rowB.Export, written)
	// The first host cannot take the image back while the second has it.
	if out, err := a.blktap("resume", "0", "xvdb"); err == nil || !strings.Contains(err.Error()+out, "locked by") {
		t.Fatalf("resume on the first host while the second writes: %v %s", err, out)
	}
	stopDaemon(t, h.bin, b.stateDir, b.cmd, b.done)
	stopDaemon(t, h.bin, a.stateDir, a.cmd, a.done)
}

// TestEndToEndRBDHostKilled: the first host dies (its daemon and worker
// killed -9) with fio's writes in flight; the second takes the image over
// only by blocklisting the first's client, and serves every write fio saw
// acknowledged.
func TestEndToEndRBDHostKilled(t *testing.T) {
	h := startHandoff(t)
	a, b := h.a, h.b
	pid := a.waitRow("vm1", "its worker's pid", func(r lsRow) bool { return r.WorkerPid > 0 }).WorkerPid
	if cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); !strings.Contains(string(cmdline), "worker") {
		t.Fatalf("pid %d, the first host's worker by its ls, runs %q", pid, cmdline)
	}
	written := a.counters("vm1").IO.NBDWrites
	// fio saves its state first and the host dies right after, with what
	// fio had in flight then: fio's nbd engine cannot be trusted to save
	// a state, or even to exit, once its server dies under it (fio 3.33
	// spun on a dead libnbd handle in 1 of 6 runs, logging without end).
	h.saveState(t)
	start := time.Now()
	a.cmd.Process.Kill()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill the first host's worker %d: %v", pid, err)
	}
	t.Logf("first host's daemon and worker %d killed", pid)
	rowB := b.waitConnectedWithin(90*time.Second, "vm1")["vm1"]
	t.Logf("second host serves the image %v after the first died", time.Since(start).Round(100*time.Millisecond))
	if bl := h.c.Ceph(t, "osd", "blocklist", "ls"); !strings.Contains(bl, h.holder) {
		t.Fatalf("the dead holder %s is not blocklisted:\n%s", h.holder, bl)
	}
	h.verify(t, rowB.Export, written)
}

// handoff is two hosts declaring one rbd image writable, the first
// serving it under a paced fio writer and the second refused.
type handoff struct {
	c          *cephdev.Cluster
	bin, fio   string
	a, b       *daemon
	aux        string   // fio's state directory
	job        []string // fio's job, shared by the writer and the verifier
	trigger    string   // the file that makes fio save its verify state
	state      string   // the state fio saves
	holder     string   // the first host's lock owner, as the refusal names it
	writer     *exec.Cmd
	writerDone chan error
	writerOut  *tailBuffer
}

func startHandoff(t *testing.T) *handoff {
	h := &handoff{c: cephdev.Get(t), fio: oracle.Require(t, "fio"), aux: t.TempDir()}
	qemuIO := oracle.Require(t, "qemu-io")
	h.bin = buildRBDBinary(t)
	name, spec := h.c.Name(t)
	t.Cleanup(func() { exec.Command("rbd", "-c", h.c.Conf, "rm", "--no-progress", "rbd/"+name).Run() })
	yaml := filepath.Join(t.TempDir(), "disks.yaml")
	os.WriteFile(yaml, []byte(fmt.Sprintf(`disks:
  - name: vm1
    format: rbd
    image: %q
    domain: 0
    device: xvdb
    create: {size: 64M}
`, spec)), 0o644)

	h.a = startDaemon(t, h.bin, yaml)
	rowA := h.a.waitConnected("vm1")["vm1"]
	// What rbd reports of the image we created from the YAML.
	if info := h.c.RBD(t, "info", "rbd/"+name); !strings.Contains(info, "size 64 MiB") || !strings.Contains(info, "exclusive-lock") {
		t.Fatalf("rbd info:\n%s", info)
	}
	runTool(t, qemuIO, "-f", "raw", "-c", "write -P 0x61 0 1M", "-c", "flush", rowA.Export)

	// fio writes verifiable blocks (checksummed headers) through A, paced
	// so that the handoff lands in the middle of its run.
	h.job = []string{"--name=handoff", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--iodepth=16",
		"--offset=2M", "--size=48M", "--randseed=42", "--verify=crc32c", "--verify_fatal=1", "--aux-path=" + h.aux}
	h.trigger = filepath.Join(h.aux, "trigger")
	h.state = filepath.Join(h.aux, "local-handoff-0-verify.state")
	h.writer = exec.Command(h.fio, append(h.job, "--uri="+rowA.Export, "--do_verify=0", "--rate_iops=800",
		"--verify_state_save=1", "--trigger-file="+h.trigger)...)
	h.writerOut = &tailBuffer{max: 64 << 10}
	h.writer.Stdout, h.writer.Stderr = h.writerOut, h.writerOut
	if err := h.writer.Start(); err != nil {
		t.Fatal(err)
	}
	h.writerDone = make(chan error, 1)
	go func() { h.writerDone <- h.writer.Wait() }()
	t.Cleanup(func() { h.writer.Process.Kill() })

	h.b = startDaemon(t, h.bin, yaml)
	h.b.waitAnswering()
	refused := h.b.waitRow("vm1", "a refusal naming the lock holder", func(r lsRow) bool { return strings.Contains(r.Error, "locked by") })
	host, _ := os.Hostname()
	if !strings.Contains(refused.Error, "host "+host) {
		t.Errorf("the refusal does not name the holder's host: %q", refused.Error)
	}
	if _, rest, ok := strings.Cut(refused.Error, "locked by "); ok {
		h.holder, _, _ = strings.Cut(rest, " ")
	}
	if h.holder == "" {
		t.Fatalf("the refusal names no lock owner: %q", refused.Error)
	}
	t.Logf("second host refused: %s", refused.Error)

	// The handoff happens under the writer, once it has written 1000 blocks.
	waitFor(t, 60*time.Second, "fio's first 1000 writes through the first host", func() bool {
		return h.a.counters("vm1").IO.NBDWrites >= 1000
	})
	select {
	case err := <-h.writerDone:
		t.Fatalf("fio finished before the handoff: %v\n%s", err, h.writerOut.String())
	default:
	}
	return h
}

// saveState has fio save its verify state through its trigger file (the
// writes it saw completed, and those in flight, to leave out), then ends
// the writer, as the guest ends on the host it leaves: what it still has
// in flight is never acknowledged.
func (h *handoff) saveState(t *testing.T) {
	t.Helper()
	os.WriteFile(h.trigger, nil, 0o644)
	waitFor(t, 30*time.Second, "fio's saved verify state", func() bool {
		st, err := os.Stat(h.state)
		return err == nil && st.Size() > 0
	})
	h.writer.Process.Kill()
}

// tailBuffer keeps the last max bytes written to it: a client gone wrong
// may log without end.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (tb *tailBuffer) Write(p []byte) (int, error) {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	tb.b = append(tb.b, p...)
	if over := len(tb.b) - tb.max; over > 0 {
		tb.b = append(tb.b[:0], tb.b[over:]...)
	}
	return len(p), nil
}

func (tb *tailBuffer) String() string {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	return string(tb.b)
}

// verify has fio read back through uri every write its state file says
// the first host acknowledged, and checks that covers at least written
// blocks less those that may have been in flight (the queue depth).
func (h *handoff) verify(t *testing.T, uri string, written uint64) {
	t.Helper()
	// The verification runs at depth 1: fio 3.33 finds where the saved
	// state ends by counting completed reads, which lag the issued ones by
	// the depth, and would read on past the last completed write.
	out := runTool(t, h.fio, append(h.job, "--uri="+uri, "--verify_only=1", "--verify_state_load=1",
		"--iodepth=1", "--output-format=json")...)
	var report struct {
		Jobs []struct {
			Error int `json:"error"`
			Read  struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"read"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &report); err != nil || len(report.Jobs) != 1 {
		t.Fatalf("fio's report: %v\n%s", err, out)
	}
	if got, least := report.Jobs[0].Read.IOBytes, (int64(written)-16)*4096; report.Jobs[0].Error != 0 || got < least {
		t.Fatalf("fio verified %d bytes through the second host, want at least %d:\n%s", got, least, out)
	}
	t.Logf("fio verified %.1f MiB written through the first host", float64(report.Jobs[0].Read.IOBytes)/(1<<20))
}

// TestRBDImageTools: convert imports a qcow2 into the pool and exports it
// back, as qemu-img compare sees it; info describes the image as qemu-img
// does one that no file holds.
func TestRBDImageTools(t *testing.T) {
	c := cephdev.Get(t)
	qemuImg := oracle.Require(t, "qemu-img")
	qemuIO := oracle.Require(t, "qemu-io")
	bin := buildRBDBinary(t)
	dir := t.TempDir()
	name, spec := c.Name(t)
	t.Cleanup(func() { exec.Command("rbd", "-c", c.Conf, "rm", "--no-progress", "rbd/"+name).Run() })
	src, back := filepath.Join(dir, "src.qcow2"), filepath.Join(dir, "back.qcow2")
	runTool(t, qemuImg, "create", "-f", "qcow2", src, "48M")
	runTool(t, qemuIO, "-c", "write -P 0x42 1M 64k", "-c", "write -P 0x43 40M 1M", src)
	rbdName := "rbd:" + spec
	runTool(t, bin, "image", "convert", "-f", "qcow2", "-O", "rbd", src, rbdName)
	if out := runTool(t, qemuImg, "compare", "-f", "qcow2", "-F", "raw", src, rbdName); !strings.Contains(out, "Images are identical") {
		t.Fatalf("qemu-img compare after the import:\n%s", out)
	}
	info := runTool(t, bin, "image", "info", rbdName)
	if !strings.Contains(info, "virtual size: 48 MiB") || !strings.Contains(info, "disk size: unavailable") {
		t.Fatalf("image info:\n%s", info)
	}
	runTool(t, bin, "image", "convert", "-O", "qcow2", rbdName, back)
	if out := runTool(t, qemuImg, "compare", src, back); !strings.Contains(out, "Images are identical") {
		t.Fatalf("qemu-img compare after the export:\n%s", out)
	}
	// Creating over an existing image is refused.
	if out, err := exec.Command(bin, "image", "create", "-f", "rbd", rbdName, "1M").CombinedOutput(); err == nil || !strings.Contains(string(out), "exists") {
		t.Fatalf("create over an existing image: %v %s", err, out)
	}
}

// TestEndToEndRBDCrash is the crash matrix for rbd disks, to dom0 (the
// export) and to a guest view: journaling writers under SIGKILL of the
// workers, the daemon and both; every flushed block must survive. A
// killed worker's lock is broken at once by the worker that replaces it
// (its process is gone), not after the OSDs' watch timeout.
func TestEndToEndRBDCrash(t *testing.T) {
	c := cephdev.Get(t)
	bin := buildRBDBinary(t)
	dir := t.TempDir()
	var disks []*crashDisk
	var names []string
	var y strings.Builder
	y.WriteString("disks:\n")
	for _, domain := range []int{0, 1} {
		base, _ := c.Name(t)
		image := fmt.Sprintf("%s-dom%d", base, domain)
		spec := "rbd/" + image + ":conf=" + c.Conf
		t.Cleanup(func() { exec.Command("rbd", "-c", c.Conf, "rm", "--no-progress", "rbd/"+image).Run() })
		cd := &crashDisk{name: fmt.Sprintf("rbd-dom%d", domain), kind: "rbd", format: "rbd", guest: domain != 0}
		fmt.Fprintf(&y, "  - {name: %s, image: %q, format: rbd, domain: %d, device: xvdb, create: {size: %d}}\n", cd.name, spec, domain, crashSize)
		cd.seed = uint32(len(disks) + 1)
		cd.j = newJournal(crashSize / crashBlock)
		disks = append(disks, cd)
		names = append(names, cd.name)
	}
	cfg := filepath.Join(dir, "disks.yaml")
	os.WriteFile(cfg, []byte(y.String()), 0o644)
	d := startDaemon(t, bin, cfg)
	openCrashClients(t, d, disks, names)
	d, report := crashRounds(t, d, cfg, disks, names, crashtest.Rounds(1))
	finishCrashMatrix(t, d, disks, report, bin, "")
}

// TestEndToEndRBDFioVerify: fio writes and verifies an rbd disk through
// the dom0 export and through a guest view (the local frontend's ring)
// at once.
func TestEndToEndRBDFioVerify(t *testing.T) {
	c := cephdev.Get(t)
	fio := oracle.Require(t, "fio")
	bin := buildRBDBinary(t)
	var y strings.Builder
	y.WriteString("disks:\n")
	for _, domain := range []int{0, 1} {
		base, _ := c.Name(t)
		image := fmt.Sprintf("%s-dom%d", base, domain)
		t.Cleanup(func() { exec.Command("rbd", "-c", c.Conf, "rm", "--no-progress", "rbd/"+image).Run() })
		fmt.Fprintf(&y, "  - {name: fio%d, image: %q, format: rbd, domain: %d, device: xvdb, create: {size: 64M}}\n",
			domain, "rbd/"+image+":conf="+c.Conf, domain)
	}
	cfg := filepath.Join(t.TempDir(), "disks.yaml")
	os.WriteFile(cfg, []byte(y.String()), 0o644)
	d := startDaemon(t, bin, cfg)
	rows := d.waitConnected("fio0", "fio1")
	results := make(chan fioResult, 2)
	for _, n := range []string{"fio0", "fio1"} {
		startFioVerify(t, fio, n, rows[n].Export, "32M", 100000, results)
	}
	for range 2 {
		r := <-results
		if r.err != nil || strings.Contains(r.out, "verify:") && strings.Contains(r.out, "bad") {
			t.Errorf("fio on %s: %v\n%s", r.name, r.err, r.out)
		}
	}
}

// waitFor polls cond every 50 ms until it holds, failing the test after
// limit with what it was waiting for.
func waitFor(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(limit); !cond(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %v", what, limit)
		}
	}
}
