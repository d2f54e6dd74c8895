package worker

import (
	"bytes"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/frontend"
)

// TestFlushInFlightAtWorkerDeath: a worker process is stopped, a FLUSH is
// published on its ring, and the worker is killed with SIGKILL: the flush
// is in flight at its death. A new worker process on the same image and
// ring must answer it, and only after its image's Flush returned (its
// latency meter counts the flush by the time the answer arrives); every
// write the dead worker
// acknowledged must read back. VMDK once kept grain-table updates until
// Flush and lost them here.
func TestFlushInFlightAtWorkerDeath(t *testing.T) {
	const size = 16 << 20
	img := filepath.Join(t.TempDir(), "d.vmdk")
	if err := formats.Create("vmdk", img, formats.CreateOptions{Size: size}); err != nil {
		t.Fatal(err)
	}
	f, err := frontend.New(frontend.Options{Protocol: blkif.X86_64})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p1 := startTestWorker(t)
	attachVMDK(t, p1, f, img)
	if err := f.Connect(size/512, 512, false); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	for i := range 48 {
		off := int64(i) * 300 << 10
		b := bytes.Repeat([]byte{byte(i + 1)}, 8<<10)
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], b)
	}

	if err := syscall.Kill(p1.Pid(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	flushed := make(chan error, 1)
	go func() { flushed <- f.Flush() }()
	time.Sleep(100 * time.Millisecond) // the FLUSH is on the ring, unanswered
	select {
	case err := <-flushed:
		t.Fatalf("a stopped worker answered the flush: %v", err)
	default:
	}
	if err := syscall.Kill(p1.Pid(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-p1.Done()

	p2 := startTestWorker(t)
	attachVMDK(t, p2, f, img)
	select {
	case err := <-flushed:
		if err != nil {
			t.Fatalf("the flush in flight at the death: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the new worker did not answer the flush in flight")
	}
	rep, err := p2.Call(ctx(t), Request{Op: OpStats})
	if err != nil {
		t.Fatal(err)
	}
	// The latency meter records an image Flush when it has returned, and
	// the ring answers only after that: a count here, read once the
	// answer arrived, means the answer followed the fdatasync.
	if rep.Stats.RingFlushes == 0 || rep.Stats.Latency["flush"].Count == 0 {
		t.Fatalf("the flush was answered, but the new worker's image never flushed: %+v", rep.Stats)
	}
	got := make([]byte, size)
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("writes the dead worker acknowledged are lost")
	}
}

// attachVMDK opens the vmdk image img in worker p and connects it to f's
// ring.
func attachVMDK(t *testing.T, p *Process, f *frontend.Frontend, img string) {
	t.Helper()
	if _, err := p.Call(ctx(t), Request{Op: OpOpen, Name: "d", Format: "vmdk", Path: img}); err != nil {
		t.Fatal(err)
	}
	mem, kick, notify := f.BackendFDs()
	if _, err := p.Call(ctx(t), Request{Op: OpConnect, Transport: "local", Protocol: "x86_64-abi",
		RingRefs: f.RingRefs()}, mem, kick, notify); err != nil {
		t.Fatal(err)
	}
}
