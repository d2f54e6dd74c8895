package worker

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/internal/ringfault"
	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/frontend"
)

// TestWatchRing: a ring the worker stops on its own (its frontend
// published more requests than the ring holds) is reported through the
// watch as it happens, with the error stats give; a ring the daemon
// disconnects is not reported.
func TestWatchRing(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "w.raw")
	if err := formats.Create("raw", img, formats.CreateOptions{Size: 8 << 20}); err != nil {
		t.Fatal(err)
	}
	p := startTestWorker(t)
	if _, err := p.Call(ctx(t), Request{Op: OpOpen, Name: "w", Format: "raw", Path: img}); err != nil {
		t.Fatal(err)
	}
	faults := make(chan struct{}, 4)
	rw, err := p.WatchRing(ctx(t), func() { faults <- struct{}{} })
	if err != nil {
		t.Fatal(err)
	}
	connect := func() *frontend.Frontend {
		f, err := frontend.New(frontend.Options{Protocol: blkif.X86_64})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		mem, kick, notify := f.BackendFDs()
		if _, err := p.Call(ctx(t), Request{Op: OpConnect, Transport: "local",
			Protocol: "x86_64-abi", RingRefs: f.RingRefs()}, mem, kick, notify); err != nil {
			t.Fatal(err)
		}
		if err := f.Connect(8<<20/512, 512, false); err != nil {
			t.Fatal(err)
		}
		return f
	}

	// A clean disconnect is no fault.
	f := connect()
	if _, err := f.WriteAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Call(ctx(t), Request{Op: OpDisconnect}); err != nil {
		t.Fatal(err)
	}
	f.Close()
	select {
	case <-faults:
		t.Fatalf("a disconnect was reported as a fault: %q", rw.Take())
	case <-time.After(200 * time.Millisecond):
	}

	f = connect()
	if n, err := ringfault.BreakRings(os.Getpid(), ringfault.Requests); err != nil || n < 1 {
		t.Fatalf("BreakRings: %d rings, %v", n, err)
	}
	select {
	case <-faults:
	case <-time.After(20 * time.Second):
		t.Fatal("the stopped ring was never reported")
	}
	got := rep(t, p).RingError
	if msg := rw.Take(); msg == "" || msg != got {
		t.Fatalf("watch reported %q, stats say %q", msg, got)
	}
	if msg := rw.Take(); msg != "" {
		t.Fatalf("a second Take returned %q", msg)
	}
}

func rep(t *testing.T, p *Process) Reply {
	t.Helper()
	r, err := p.Call(ctx(t), Request{Op: OpStats})
	if err != nil {
		t.Fatal(err)
	}
	return r
}
