package worker

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// silentAdoptEnv runs TestAdoptSilentWorker's child half.
const silentAdoptEnv = "BLKTAP_WORKER_TEST_SILENT_ADOPT"

// A worker that accepts the adoption but never describes itself (hung,
// or still held by the old daemon) makes Adopt fail at its deadline.
// Before Adopt knew the pid, the timeout's Kill sent SIGKILL to pid 0,
// that is to the daemon's whole process group. The adopting half runs in
// a child process in a group of its own, so that such a kill ends only
// the child, and shows.
func TestAdoptSilentWorker(t *testing.T) {
	if os.Getenv(silentAdoptEnv) == "1" {
		adoptSilent(t)
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestAdoptSilentWorker$", "-test.count=1")
	cmd.Env = append(os.Environ(), silentAdoptEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("adopting a silent worker: %v (%s)\n%s", err, cmd.ProcessState, out)
	}
}

func adoptSilent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "adopt.sock")
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			defer c.Close()
			time.Sleep(10 * time.Second) // never answers
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if p, _, err := Adopt(ctx, path); err == nil {
		t.Fatalf("adopted a worker that never answered: pid %d", p.Pid())
	}
}
