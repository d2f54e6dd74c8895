package main

import (
	"context"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/blktap-go/blktap/reconciler"
)

// Attach and detach ask only whether the daemon is there, never for every
// worker's counters: a worker that cannot answer (stopped here; busy under
// load in issue 16) must not hold up another disk's attach, and a client
// that gives up waiting must not get it killed.
func TestEndToEndAttachWhileAWorkerIsStopped(t *testing.T) {
	bin, dir, d := idleDaemon(t)
	imgs := rawImages(t, bin, dir, "16M", "a.raw", "b.raw")
	a, b := imgs[0], imgs[1]
	if _, err := d.blktap("attach", "0", "raw:"+a, "xvdc", "w"); err != nil {
		t.Fatal(err)
	}
	stopped, _ := d.row("d0-xvdc")
	if stopped.WorkerPid <= 0 || stopped.Phase != "connected" {
		t.Fatalf("d0-xvdc: %+v", stopped)
	}
	if err := syscall.Kill(stopped.WorkerPid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			syscall.Kill(stopped.WorkerPid, syscall.SIGCONT)
		}
	}
	defer resume()

	// The daemon waits up to 10 s on a worker's counters; asking for them
	// made each of these take that long.
	const within = 8 * time.Second
	for _, args := range [][]string{
		{"attach", "0", "raw:" + b, "xvdd", "w", "--timeout", within.String()},
		{"detach", "0", "xvdd", "--timeout", within.String()},
	} {
		t0 := time.Now()
		if _, err := d.blktap(args...); err != nil {
			t.Fatalf("with d0-xvdc's worker stopped: %v", err)
		}
		if took := time.Since(t0); took > within {
			t.Fatalf("blktap %s took %v with another disk's worker stopped; want under %v", args[0], took, within)
		} else {
			t.Logf("blktap %s: %v with another disk's worker stopped", args[0], took.Round(time.Millisecond))
		}
	}
	// A client that stops waiting for the counters (ls's ^C, a timeout)
	// cut the daemon's call short, and a call cut short kills its worker.
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	_, err := reconciler.FetchStats(ctx, d.stateDir)
	cancel()
	if err == nil {
		t.Fatalf("counters of a stopped worker came back")
	}
	time.Sleep(500 * time.Millisecond) // the daemon notices the client gone
	resume()
	if r, _ := d.row("d0-xvdc"); r.WorkerPid != stopped.WorkerPid || r.Phase != "connected" {
		t.Fatalf("d0-xvdc after SIGCONT: %+v, want worker %d still connected", r, stopped.WorkerPid)
	}
}

// rawImages creates a raw image of size for each name in dir and returns
// their paths.
func rawImages(t *testing.T, bin, dir, size string, names ...string) []string {
	t.Helper()
	var paths []string
	for _, n := range names {
		f := filepath.Join(dir, n)
		if out, err := exec.Command(bin, "image", "create", "-f", "raw", f, size).CombinedOutput(); err != nil {
			t.Fatalf("image create: %v %s", err, out)
		}
		paths = append(paths, f)
	}
	return paths
}
