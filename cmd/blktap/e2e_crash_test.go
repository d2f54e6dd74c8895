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

// kill -9 of one worker while fio writes with verify through three guest
// views (the ring path): the other two see no error; the killed disk's
// fio carries on after the restart (the local frontend resubmits what was
// in flight, as blkfront does) and its verify passes.
func TestEndToEndWorkerCrashUnderLoad(t *testing.T) {
	fio := oracle.Require(t, "fio")
	bin := buildBinary(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "disks.yaml")
	var y strings.Builder
	y.WriteString("disks:\n")
	for i, n := range []string{"g1", "g2", "g3"} {
		fmt.Fprintf(&y, "  - {name: %s, image: %s/%s.raw, format: raw, domain: %d, device: xvdb, create: {size: 64M}}\n", n, dir, n, i+1)
	}
	if err := os.WriteFile(cfg, []byte(y.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, bin, cfg)
	rows := d.waitConnected("g1", "g2", "g3")
	results := make(chan fioResult, 3)
	for _, n := range []string{"g1", "g2", "g3"} {
		startFioVerify(t, fio, n, rows[n].Export, "16M", 1000, results)
	}
	time.Sleep(1500 * time.Millisecond)
	if err := syscall.Kill(rows["g2"].WorkerPid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		select {
		case r := <-results:
			if r.err != nil {
				t.Errorf("fio on %s: %v\n%s", r.name, r.err, r.out)
			}
		case <-time.After(2 * time.Minute):
			t.Fatal("fio never finished")
		}
	}
	r, _ := d.row("g2")
	if r.WorkerPid == rows["g2"].WorkerPid {
		t.Fatalf("g2's worker was not replaced: %+v", r)
	}
	for _, n := range []string{"g1", "g3"} {
		if r, _ := d.row(n); r.WorkerPid != rows[n].WorkerPid {
			t.Errorf("%s's worker changed: the crash was not contained", n)
		}
	}
}
