package worker

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/formats/raw"
	"github.com/blktap-go/blktap/internal/oracle"
	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/frontend"
)

// noURingEnv makes a test worker act as on a host where io_uring is
// disabled (sysctl kernel.io_uring_disabled, a seccomp profile).
const noURingEnv = "BLKTAP_WORKER_TEST_NO_URING"

// Asking for io_uring never fails a disk: another format, or a host that
// forbids io_uring, gets threads (and a disk that works); auto means
// threads; an engine nobody knows is refused.
func TestURingFallback(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		format, io string
		noURing    bool
		want       bool
	}{
		{"raw", IOURing, false, raw.URingSupported() == nil},
		{"raw", IOURing, true, false},
		{"qcow2", IOURing, false, false},
		{"raw", IOAuto, false, false},
		{"raw", "", false, false},
		{"raw", IOThreads, false, false},
	} {
		img := filepath.Join(dir, fmt.Sprintf("%s-%s-%v.img", c.format, c.io, c.noURing))
		if err := formats.Create(c.format, img, formats.CreateOptions{Size: 1 << 20}); err != nil {
			t.Fatal(err)
		}
		if c.noURing {
			t.Setenv(noURingEnv, "1")
		}
		p := startTestWorker(t)
		os.Unsetenv(noURingEnv)
		if _, err := p.Call(ctx(t), Request{Op: OpOpen, Name: "d", Format: c.format, Path: img, IO: c.io}); err != nil {
			t.Fatalf("%+v: open: %v", c, err)
		}
		rep, err := p.Call(ctx(t), Request{Op: OpDescribe})
		if err != nil || rep.Describe.URing != c.want {
			t.Fatalf("%+v: describe %+v, %v; want uring %v", c, rep.Describe, err, c.want)
		}
	}
	p := startTestWorker(t)
	if _, err := p.Call(ctx(t), Request{Op: OpOpen, Name: "d", Format: "raw", Path: filepath.Join(dir, "raw-uring-false.img"), IO: "aio"}); err == nil {
		t.Fatal("io: aio accepted")
	}
}

// TestURingKill: a raw disk served with io: uring takes writes from
// several writers at once (so ring batches hold many requests, submitted
// together) and flushes, and its worker is killed with SIGKILL mid-stream.
// Every write acknowledged before the kill must be in the file, as
// qemu-img compare sees it against what the writers were told; a write in
// flight at the kill may or may not be.
func TestURingKill(t *testing.T) {
	oracle.RequireURing(t, raw.URingSupported())
	qimg := oracle.Require(t, "qemu-img")
	const writers = 8
	dir := t.TempDir()
	img := filepath.Join(dir, "d.raw")
	if err := formats.Create("raw", img, formats.CreateOptions{Size: uringSize}); err != nil {
		t.Fatal(err)
	}
	f, p := uringDisk(t, img)

	l := &uringLedger{acked: make([]byte, uringBlocks), inFlight: make([]bool, uringBlocks), stop: make(chan struct{})}
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() { l.writer(f, w, writers) })
	}
	time.Sleep(time.Duration(300+rand.IntN(400)) * time.Millisecond)
	if err := syscall.Kill(p.Pid(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-p.Done()
	f.Close() // fails the writers still waiting
	close(l.stop)
	wg.Wait()
	l.verify(t, qimg, dir, img, writers)
}

const uringSize, uringBlock = 8 << 20, 16 << 10
const uringBlocks = uringSize / uringBlock

// uringDisk opens img with io: uring in a new worker and connects a local
// frontend to it.
func uringDisk(t *testing.T, img string) (*frontend.Frontend, *Process) {
	f, err := frontend.New(frontend.Options{Protocol: blkif.X86_64})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	p := startTestWorker(t)
	if _, err := p.Call(ctx(t), Request{Op: OpOpen, Name: "d", Format: "raw", Path: img, IO: IOURing}); err != nil {
		t.Fatal(err)
	}
	if rep, err := p.Call(ctx(t), Request{Op: OpDescribe}); err != nil || !rep.Describe.URing {
		t.Fatalf("describe: %+v, %v: the disk did not get io_uring", rep.Describe, err)
	}
	mem, kick, notify := f.BackendFDs()
	if _, err := p.Call(ctx(t), Request{Op: OpConnect, Transport: "local", Protocol: "x86_64-abi",
		RingRefs: f.RingRefs()}, mem, kick, notify); err != nil {
		t.Fatal(err)
	}
	if err := f.Connect(uringSize/512, 512, false); err != nil {
		t.Fatal(err)
	}
	return f, p
}

// uringLedger: writer w owns blocks w, w+writers, ...; acked[b] is the
// last pattern acknowledged there, inFlight[b] one not yet answered.
type uringLedger struct {
	mu       sync.Mutex
	acked    []byte
	inFlight []bool
	stop     chan struct{}
}

// writer writes random patterns to its own blocks, flushing every 16th
// write, until stop or the worker dies.
func (l *uringLedger) writer(f *frontend.Frontend, w, writers int) {
	r := rand.New(rand.NewPCG(uint64(w), 7))
	for i := 0; ; i++ {
		select {
		case <-l.stop:
			return
		default:
		}
		b := r.IntN(uringBlocks/writers)*writers + w
		pat := byte(1 + r.IntN(250))
		l.mu.Lock()
		l.inFlight[b] = true
		l.mu.Unlock()
		if _, err := f.WriteAt(bytes.Repeat([]byte{pat}, uringBlock), int64(b)*uringBlock); err != nil {
			return // the worker is dead
		}
		l.mu.Lock()
		l.acked[b], l.inFlight[b] = pat, false
		l.mu.Unlock()
		if i%16 == 15 && f.Flush() != nil {
			return
		}
	}
}

// verify: every write acknowledged before the kill is in img, as qemu-img
// compare sees it against what the writers were told.
func (l *uringLedger) verify(t *testing.T, qimg, dir, img string, writers int) {
	want, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	written := 0
	for b, pat := range l.acked {
		if l.inFlight[b] {
			continue // the image's block may hold either; take what it has
		}
		if pat != 0 {
			written++
		}
		copy(want[b*uringBlock:(b+1)*uringBlock], bytes.Repeat([]byte{pat}, uringBlock))
	}
	if written < writers {
		t.Fatalf("only %d blocks written before the kill: the test proves nothing", written)
	}
	ref := filepath.Join(dir, "want.raw")
	if err := os.WriteFile(ref, want, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(qimg, "compare", "-f", "raw", "-F", "raw", img, ref).CombinedOutput(); err != nil {
		t.Fatalf("an acknowledged write is missing after the kill: %v\n%s", err, out)
	}
	t.Logf("%d blocks acknowledged before the kill", written)
}
