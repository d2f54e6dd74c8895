package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/oracle"
)

// kill -9 of the daemon while fio writes with verify through two disks'
// exports; a new daemon adopts the workers, which never stopped serving:
// both fio runs finish without a verify error. The guest disk, whose local
// frontend died with the daemon, is reconnected and keeps its data.
func TestEndToEndDaemonRestart(t *testing.T) {
	fio := oracle.Require(t, "fio")
	qemuIO := oracle.Require(t, "qemu-io")
	bin := buildBinary(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "disks.yaml")
	yaml := fmt.Sprintf(`disks:
  - {name: a, image: %[1]s/a.raw, format: raw, device: xvdb, create: {size: 64M}}
  - {name: b, image: %[1]s/b.raw, format: raw, device: xvdc, create: {size: 64M}}
  - {name: g, image: %[1]s/g.raw, format: raw, domain: 1, device: xvdb, create: {size: 16M}}
`, dir)
	if err := os.WriteFile(cfg, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, bin, cfg)
	rows := d.waitConnected("a", "b", "g")
	runTool(t, qemuIO, "-f", "raw", rows["g"].Export, "-c", "write -P 0x67 0 1M")

	results := make(chan fioResult, 2)
	for _, n := range []string{"a", "b"} {
		startFioVerify(t, fio, n, rows[n].Export, "24M", 1500, results)
	}
	time.Sleep(1500 * time.Millisecond)

	// The daemon dies without a chance to clean up.
	if err := d.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-d.done
	time.Sleep(500 * time.Millisecond)
	for _, n := range []string{"a", "b", "g"} {
		if err := syscall.Kill(rows[n].WorkerPid, 0); err != nil {
			t.Fatalf("worker of %s died with the daemon: %v", n, err)
		}
	}

	// A new daemon on the same state directory.
	d2 := restartDaemon(t, d, cfg)
	rows2 := d2.waitConnected("a", "b", "g")
	for _, n := range []string{"a", "b"} {
		if rows2[n].WorkerPid != rows[n].WorkerPid {
			t.Errorf("%s: worker %d replaced by %d; want it adopted", n, rows[n].WorkerPid, rows2[n].WorkerPid)
		}
	}
	for range 2 {
		select {
		case r := <-results:
			if r.err != nil || strings.Contains(r.out, "verify") && strings.Contains(r.out, "bad") {
				t.Errorf("fio on %s across the daemon restart: %v\n%s", r.name, r.err, r.out)
			}
		case <-time.After(2 * time.Minute):
			t.Fatal("fio never finished")
		}
	}
	// The guest's ring came back with its data.
	runTool(t, qemuIO, "-f", "raw", rows2["g"].Export, "-c", "read -P 0x67 0 1M")
}
