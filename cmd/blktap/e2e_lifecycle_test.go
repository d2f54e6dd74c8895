package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/oracle"
)

// Disks made by `blktap attach` on the embedded xenstored survive a daemon
// restart: the tree is saved in STATE/xenstored.db and loaded again, so the
// next daemon still knows both devices, adopts their workers and serves
// them.
func TestEndToEndAttachSurvivesRestart(t *testing.T) {
	qemuIO := oracle.Require(t, "qemu-io")
	bin, dir, d := idleDaemon(t)
	imgs := rawImages(t, bin, dir, "16M", "a.raw", "b.raw")
	a, b := imgs[0], imgs[1]
	uriA := d.attachURI("0", "aio:"+a, "xvdc", "w")
	uriB := d.attachURI("1", "aio:"+b, "xvdd", "w")
	runTool(t, qemuIO, "-f", "raw", uriA, "-c", "write -P 0x5e 0 1M")
	runTool(t, qemuIO, "-f", "raw", uriB, "-c", "write -P 0x6f 0 1M")
	rowA, _ := d.row("d0-xvdc")
	rowB, _ := d.row("d1-xvdd")

	// Killed without a chance to save on exit: the saves after each
	// change are what the next daemon finds.
	time.Sleep(time.Second)
	if err := d.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-d.done
	if _, err := os.Stat(filepath.Join(d.stateDir, "xenstored.db")); err != nil {
		t.Fatalf("no saved tree: %v", err)
	}

	d2 := restartDaemon(t, d, "")
	rows := d2.waitConnected("d0-xvdc", "d1-xvdd")
	if rows["d0-xvdc"].WorkerPid != rowA.WorkerPid || rows["d1-xvdd"].WorkerPid != rowB.WorkerPid {
		t.Errorf("workers %d %d, want %d %d adopted", rows["d0-xvdc"].WorkerPid, rows["d1-xvdd"].WorkerPid, rowA.WorkerPid, rowB.WorkerPid)
	}
	runTool(t, qemuIO, "-f", "raw", rows["d0-xvdc"].Export, "-c", "read -P 0x5e 0 1M")
	runTool(t, qemuIO, "-f", "raw", rows["d1-xvdd"].Export, "-c", "read -P 0x6f 0 1M")
	// And detach still works on what was restored.
	if out, err := d2.blktap("detach", "1", "xvdd"); err != nil {
		t.Fatalf("detach after restart: %v %s", err, out)
	}
}

// Under systemd (Type=notify): READY=1 once every declared disk has
// converged, STOPPING=1 on the way out, nothing from the workers.
func TestEndToEndSdNotify(t *testing.T) {
	oracle.Require(t, "qemu-io")
	bin := buildBinary(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "disks.yaml")
	yaml := fmt.Sprintf(`disks:
  - {name: n0, image: %[1]s/n0.raw, format: raw, device: xvdb, create: {size: 16M}}
  - {name: n1, image: %[1]s/n1.raw, format: raw, domain: 1, device: xvdb, create: {size: 16M}}
  - {name: broken, image: %[1]s/missing.qcow2, format: qcow2, domain: 2, device: xvdb}
`, dir)
	if err := os.WriteFile(cfg, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "notify")
	msgs := notifySocket(t, sock)

	// A daemon that has never started (restartDaemon needs only the state
	// directory and the binary).
	state, err := os.MkdirTemp("", "bt-state-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(state) })
	d := restartDaemon(t, &daemon{t: t, bin: bin, stateDir: state}, cfg, "NOTIFY_SOCKET="+sock)
	select {
	case m := <-msgs:
		if m != "READY=1" {
			t.Fatalf("first message %q, want READY=1", m)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("no READY=1 within 60s")
	}
	// Ready means converged: no polling needed.
	rows := map[string]lsRow{}
	for _, r := range d.ls() {
		rows[r.Name] = r
	}
	for _, n := range []string{"n0", "n1"} {
		if r := rows[n]; r.Phase != "connected" || r.Export == "" {
			t.Errorf("%s at READY=1: %+v, want connected", n, r)
		}
	}
	if r := rows["broken"]; r.Error == "" {
		t.Errorf("broken at READY=1: %+v, want its error", r)
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	<-d.done
	select {
	case m := <-msgs:
		if m != "STOPPING=1" {
			t.Errorf("message %q, want STOPPING=1", m)
		}
	case <-time.After(5 * time.Second):
		t.Error("no STOPPING=1")
	}
	// The workers never inherited the socket.
	for _, n := range []string{"n0", "n1"} {
		env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", rows[n].WorkerPid))
		if err != nil {
			t.Fatalf("worker of %s: %v", n, err)
		}
		if strings.Contains(string(env), "NOTIFY_SOCKET") {
			t.Errorf("worker of %s has NOTIFY_SOCKET", n)
		}
	}
	// Leave nothing running: a new daemon adopts them, and the test's
	// cleanup shuts it down.
	restartDaemon(t, d, cfg).waitConnected("n0", "n1")
}

// notifySocket listens as systemd does on sock and passes on each message.
func notifySocket(t *testing.T, sock string) <-chan string {
	ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	msgs := make(chan string, 16)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := ln.Read(buf)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	return msgs
}
