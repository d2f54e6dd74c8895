package main

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/oracle"
)

// Live snapshot while fio writes with verify, on both paths: no error, and
// the overlay's backing file is the old image.
func TestEndToEndLiveSnapshot(t *testing.T) {
	fio := oracle.Require(t, "fio")
	qemuImg := oracle.Require(t, "qemu-img")
	qemuIO := oracle.Require(t, "qemu-io")
	bin, dir, d := idleDaemon(t)
	for _, domid := range []string{"0", "1"} {
		t.Run("dom"+domid, func(t *testing.T) {
			base := filepath.Join(dir, "base"+domid+".raw")
			overlay := filepath.Join(dir, "overlay"+domid+".img")
			if out, err := exec.Command(bin, "image", "create", "-f", "raw", base, "64M").CombinedOutput(); err != nil {
				t.Fatalf("%v %s", err, out)
			}
			uri := d.attachURI(domid, "aio:"+base, "xvdc", "w")

			pauseHoldsIO(t, d, qemuIO, domid, uri)

			// Snapshot under load.
			job := exec.Command(fio, "--name=snap", "--ioengine=nbd", "--uri="+uri, "--rw=randwrite",
				"--bs=4k", "--iodepth=16", "--size=32M", "--offset=1M", "--verify=crc32c", "--verify_fatal=1",
				"--verify_state_save=0", "--rate_iops=2000")
			fioDone := make(chan []byte, 1)
			go func() {
				out, err := job.CombinedOutput()
				if err != nil {
					out = append(out, []byte("\nfio: "+err.Error())...)
				}
				fioDone <- out
			}()
			time.Sleep(1500 * time.Millisecond)
			if _, err := d.blktap("snapshot", domid, "xvdc", overlay); err != nil { // qcow2 by default
				t.Fatal(err)
			}
			out := <-fioDone
			if strings.Contains(string(out), "fio: exit") || strings.Contains(string(out), "verify") && strings.Contains(string(out), "bad") {
				t.Fatalf("fio across the snapshot:\n%s", out)
			}
			r, _ := d.row("d" + domid + "-xvdc")
			if r.Phase != "connected" {
				t.Fatalf("after snapshot: %+v", r)
			}
			// -U: the worker holds qemu-compatible locks on the overlay it writes.
			info := runTool(t, qemuImg, "info", "-U", "--backing-chain", overlay)
			if !strings.Contains(info, "backing file: "+base) {
				t.Fatalf("overlay's backing file is not the old image:\n%s", info)
			}
			runTool(t, qemuIO, "-f", "raw", uri, "-c", "read -P 0x44 0 64k")
			if _, err := d.blktap("detach", domid, "xvdc"); err != nil {
				t.Fatal(err)
			}
			// The chain reads through qemu as the disk did.
			runTool(t, qemuIO, "-f", "qcow2", overlay, "-c", "read -P 0x44 0 64k")
			runTool(t, qemuImg, "check", "-f", "qcow2", overlay)
		})
	}
}

// pauseHoldsIO: pause holds I/O; resume lets it through.
func pauseHoldsIO(t *testing.T, d *daemon, qemuIO, domid, uri string) {
	if _, err := d.blktap("pause", domid, "xvdc"); err != nil {
		t.Fatal(err)
	}
	d.waitRow("d"+domid+"-xvdc", "paused", func(r lsRow) bool { return r.Phase == "paused" })
	held := exec.Command(qemuIO, "-f", "raw", uri, "-c", "write -P 0x44 0 64k")
	done := make(chan error, 1)
	if err := held.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- held.Wait() }()
	select {
	case err := <-done:
		t.Fatalf("a write went through a paused disk: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
	if _, err := d.blktap("resume", domid, "xvdc"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("held write failed after resume: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("held write never completed after resume")
	}
}
