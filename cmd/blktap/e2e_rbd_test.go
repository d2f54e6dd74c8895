//go:build rbd

package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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
// handoff); then the second serves the first's data, and the first can
// no longer take the image back.
func TestEndToEndRBDHandoff(t *testing.T) {
	c := cephdev.Get(t)
	qemuIO := oracle.Require(t, "qemu-io")
	bin := buildRBDBinary(t)
	name, spec := c.Name(t)
	t.Cleanup(func() { exec.Command("rbd", "-c", c.Conf, "rm", "--no-progress", "rbd/"+name).Run() })
	yaml := filepath.Join(t.TempDir(), "disks.yaml")
	os.WriteFile(yaml, []byte(fmt.Sprintf(`disks:
  - name: vm1
    format: rbd
    image: %q
    domain: 0
    device: xvdb
    create: {size: 64M}
`, spec)), 0o644)

	a := startDaemon(t, bin, yaml)
	rowA := a.waitConnected("vm1")["vm1"]
	// What rbd reports of the image we created from the YAML.
	if info := c.RBD(t, "info", "rbd/"+name); !strings.Contains(info, "size 64 MiB") || !strings.Contains(info, "exclusive-lock") {
		t.Fatalf("rbd info:\n%s", info)
	}
	runTool(t, qemuIO, "-f", "raw", "-c", "write -P 0x61 0 1M", "-c", "flush", rowA.Export)
	// fio writes verifiable blocks (checksummed headers) through A.
	fio := oracle.Require(t, "fio")
	fioJob := []string{"--name=handoff", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--iodepth=16",
		"--offset=2M", "--size=30M", "--randseed=42", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0"}
	runTool(t, fio, append(fioJob, "--uri="+rowA.Export, "--do_verify=0")...)

	b := startDaemon(t, bin, yaml)
	b.waitAnswering()
	refused := b.waitRow("vm1", "a refusal naming the lock holder", func(r lsRow) bool { return strings.Contains(r.Error, "locked by") })
	host, _ := os.Hostname()
	if !strings.Contains(refused.Error, "host "+host) {
		t.Errorf("the refusal does not name the holder's host: %q", refused.Error)
	}
	t.Logf("second host refused: %s", refused.Error)

	start := time.Now()
	if out, err := a.blktap("pause", "0", "xvdb"); err != nil {
		t.Fatalf("pause on the first host: %v %s", err, out)
	}
	rowB := b.waitConnectedWithin(90*time.Second, "vm1")["vm1"]
	t.Logf("second host serves the image %v after the first paused", time.Since(start).Round(100*time.Millisecond))
	out := runTool(t, qemuIO, "-f", "raw", "-c", "read -P 0x61 0 1M", "-c", "write -P 0x62 1M 4k", rowB.Export)
	if strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("the second host reads other data:\n%s", out)
	}
	// Every block fio wrote through A verifies through B.
	runTool(t, fio, append(fioJob, "--uri="+rowB.Export, "--verify_only=1")...)
	// The first host cannot take the image back while the second has it.
	if out, err := a.blktap("resume", "0", "xvdb"); err == nil || !strings.Contains(err.Error()+out, "locked by") {
		t.Fatalf("resume on the first host while the second writes: %v %s", err, out)
	}
	stopDaemon(t, bin, b.stateDir, b.cmd, b.done)
	stopDaemon(t, bin, a.stateDir, a.cmd, a.done)
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
