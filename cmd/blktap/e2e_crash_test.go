package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
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
	type result struct {
		name string
		out  string
		err  error
	}
	results := make(chan result, 3)
	for _, n := range []string{"g1", "g2", "g3"} {
		cmd := exec.Command(fio, "--name="+n, "--ioengine=nbd", "--uri="+rows[n].Export,
			"--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=16M", "--rate_iops=1000",
			"--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0")
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func(n string) {
			err := cmd.Wait()
			results <- result{n, out.String(), err}
		}(n)
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
