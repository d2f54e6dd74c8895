package worker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/internal/oracle"
	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/frontend"
)

// The test binary doubles as the worker: re-executed with this variable
// set, it runs Main instead of the tests.
const workerEnv = "BLKTAP_WORKER_TEST_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(workerEnv) == "1" {
		if os.Getenv(noURingEnv) == "1" {
			uringSupported = func() error { return errors.New("io_uring_setup: operation not permitted (test)") }
		}
		os.Exit(Main(slog.New(slog.NewTextHandler(os.Stderr, nil)), os.Getenv(workerEnv+"_ADOPT") == "1"))
	}
	os.Exit(m.Run())
}

func startTestWorker(t *testing.T) *Process {
	t.Helper()
	os.Setenv(workerEnv, "1")
	defer os.Unsetenv(workerEnv)
	p, err := Start(os.Args[0], []string{"-test.run=^$"}, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		p.Close(ctx)
	})
	return p
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestWorkerOpenStatsClose(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "a.raw")
	if err := formats.Create("raw", img, formats.CreateOptions{Size: 8 << 20}); err != nil {
		t.Fatal(err)
	}
	p := startTestWorker(t)
	rep, err := p.Call(ctx(t), Request{Op: OpOpen, Name: "a", Format: "raw", Path: img})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Size != 8<<20 || rep.SectorSize != 512 {
		t.Fatalf("open reply %+v", rep)
	}
	rep, err = p.Call(ctx(t), Request{Op: OpStats})
	if err != nil || rep.Stats == nil {
		t.Fatalf("stats: %+v %v", rep, err)
	}
	if _, err := p.Call(ctx(t), Request{Op: OpFlush}); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(ctx(t)); err != nil {
		t.Fatal(err)
	}
	waitCleanExit(t, p)
}

// waitCleanExit waits for a closed worker to exit with status 0.
func waitCleanExit(t *testing.T, p *Process) {
	t.Helper()
	select {
	case <-p.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("worker did not exit after close")
	}
	if p.ExitErr() != nil {
		t.Fatalf("worker exit: %v", p.ExitErr())
	}
}

// Bad requests get error replies with a class; the worker keeps serving.
func TestWorkerBadRequests(t *testing.T) {
	p := startTestWorker(t)
	cases := []struct {
		req   Request
		class string
	}{
		{Request{Op: "frobnicate"}, "invalid"},
		{Request{Op: OpOpen, Format: "raw", Path: "relative.raw"}, "invalid"},
		{Request{Op: OpOpen, Format: "raw", Path: "/nonexistent/x.raw"}, "not-found"},
		{Request{Op: OpFlush}, "invalid"},
		{Request{Op: OpConnect, Transport: "local"}, "invalid"},
		{Request{Op: OpConnect, Transport: "xen"}, "invalid"},
	}
	for _, tc := range cases {
		_, err := p.Call(ctx(t), tc.req)
		var we *Error
		if !errors.As(err, &we) {
			t.Fatalf("%+v: err %v, want *Error", tc.req, err)
		}
		if we.Class != tc.class {
			t.Errorf("%+v: class %q (%v), want %q", tc.req, we.Class, we, tc.class)
		}
	}
	if _, err := p.Call(ctx(t), Request{Op: OpStats}); err != nil {
		t.Fatalf("worker stopped serving after bad requests: %v", err)
	}
	// A request of another protocol version is refused, not guessed at.
	p.mu.Lock()
	err := send(p.conn, time.Now().Add(5*time.Second), map[string]any{"v": 99, "op": "stats"}, nil)
	var rep Reply
	if err == nil {
		_, err = recv(p.conn, time.Now().Add(5*time.Second), &rep)
	}
	p.mu.Unlock()
	if err != nil || rep.OK || !strings.Contains(rep.Error, "version") {
		t.Fatalf("version 99: %+v %v", rep, err)
	}
}

// The daemon hands the export's listening socket over; the worker serves
// NBD on it, and the socket outlives the worker.
func TestWorkerServesNBD(t *testing.T) {
	nbdinfo := oracle.Require(t, "nbdinfo")
	dir := t.TempDir()
	img := filepath.Join(dir, "a.raw")
	if err := formats.Create("raw", img, formats.CreateOptions{Size: 4 << 20}); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "a.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for round := 0; round < 2; round++ {
		p := startTestWorker(t)
		if _, err := p.Call(ctx(t), Request{Op: OpOpen, Name: "a", Format: "raw", Path: img}); err != nil {
			t.Fatal(err)
		}
		f, err := ln.File()
		if err != nil {
			t.Fatal(err)
		}
		_, err = p.Call(ctx(t), Request{Op: OpServeNBD, Name: "a"}, int(f.Fd()))
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(nbdinfo, "--size", "nbd+unix:///?socket="+sock).CombinedOutput()
		if err != nil || strings.TrimSpace(string(out)) != "4194304" {
			t.Fatalf("round %d: nbdinfo: %v %s", round, err, out)
		}
		// Killing the worker leaves the daemon's socket: the next worker
		// serves the same address.
		p.Kill()
		<-p.Done()
	}
}

func TestBackingOpenerConfines(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	if err := formats.Create("raw", base, formats.CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	open := BackingOpener(filepath.Join(dir, "child.qcow2"), []string{dir}, 0)
	img, err := open("base.raw", "raw")
	if err != nil {
		t.Fatalf("relative backing inside the allowed dir: %v", err)
	}
	img.Close()
	if _, err := open("/etc/shadow", "raw"); !errors.Is(err, os.ErrPermission) {
		t.Fatalf("/etc/shadow as backing: %v, want a permission error", err)
	}
	if _, err := open("../../../../etc/passwd", "raw"); err == nil {
		t.Fatal("../ escape accepted")
	}
	deep := BackingOpener(filepath.Join(dir, "child"), []string{dir}, maxChain-1)
	if _, err := deep("base.raw", "raw"); !errors.Is(err, formats.ErrUnsupported) {
		t.Fatalf("chain past the limit: %v", err)
	}
}

// Multi-queue: one ring per queue, every queue serving the same image
// (blkif multi-queue), each connected on its own; a second connect of a
// queue is refused.
func TestWorkerMultiQueue(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "mq.raw")
	if err := formats.Create("raw", img, formats.CreateOptions{Size: 8 << 20}); err != nil {
		t.Fatal(err)
	}
	p := startTestWorker(t)
	if _, err := p.Call(ctx(t), Request{Op: OpOpen, Name: "mq", Format: "raw", Path: img}); err != nil {
		t.Fatal(err)
	}
	expectRing(t, p, false, "")
	var fronts []*frontend.Frontend
	for q := 0; q < 3; q++ {
		proto := []blkif.Protocol{blkif.X86_64, blkif.X86_32, blkif.X86_64}[q]
		f, err := frontend.New(frontend.Options{Protocol: proto})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		mem, kick, notify := f.BackendFDs()
		if _, err := p.Call(ctx(t), Request{Op: OpConnect, Transport: "local", Queue: q,
			Protocol: proto.String(), RingRefs: f.RingRefs()}, mem, kick, notify); err != nil {
			t.Fatalf("queue %d: %v", q, err)
		}
		if err := f.Connect(8<<20/512, 512, false); err != nil {
			t.Fatal(err)
		}
		fronts = append(fronts, f)
	}
	f, err := frontend.New(frontend.Options{Protocol: blkif.X86_64})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	mem, kick, notify := f.BackendFDs()
	if _, err := p.Call(ctx(t), Request{Op: OpConnect, Transport: "local", Queue: 1,
		Protocol: "x86_64-abi", RingRefs: f.RingRefs()}, mem, kick, notify); err == nil {
		t.Fatal("a second ring on queue 1 was accepted")
	}
	// Each queue writes its own MiB at once; every queue reads all three.
	var wg sync.WaitGroup
	for q, f := range fronts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := bytes.Repeat([]byte{byte(0x40 + q)}, 1<<20)
			if _, err := f.WriteAt(buf, int64(q)<<20); err != nil {
				t.Errorf("queue %d write: %v", q, err)
			}
		}()
	}
	wg.Wait()
	for _, f := range fronts {
		for q := range fronts {
			got := make([]byte, 1<<20)
			if _, err := f.ReadAt(got, int64(q)<<20); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, bytes.Repeat([]byte{byte(0x40 + q)}, 1<<20)) {
				t.Fatalf("queue %d's data reads wrong through another queue", q)
			}
		}
	}
	rep, err := p.Call(ctx(t), Request{Op: OpStats})
	if err != nil || rep.Stats.RingRequests == 0 {
		t.Fatalf("stats %+v %v", rep.Stats, err)
	}
	expectRing(t, p, true, "local")
	if _, err := p.Call(ctx(t), Request{Op: OpDisconnect}); err != nil {
		t.Fatal(err)
	}
	expectRing(t, p, false, "")
}

// expectRing checks what Describe says of the ring, as an adopting
// daemon reads it.
func expectRing(t *testing.T, p *Process, ring bool, transport string) {
	t.Helper()
	rep, err := p.Call(ctx(t), Request{Op: OpDescribe})
	if err != nil {
		t.Fatal(err)
	}
	if d := rep.Describe; d == nil || d.Ring != ring || d.Transport != transport {
		t.Fatalf("describe %+v, want ring %v transport %q", d, ring, transport)
	}
}

// TestDescribeXenTransport: a worker serving a guest's ring over Xen says
// so, so that an adopting daemon can keep that ring mapped. (No gntdev
// here: the ring state is set as connect leaves it.)
func TestDescribeXenTransport(t *testing.T) {
	w := &worker{name: "d1-51712"}
	w.ring.queues = map[int]*queueState{
		0: {running: true, transport: "xen"},
		1: {running: false, transport: "local"},
	}
	d := w.describe().Describe
	if !d.Ring || d.Transport != "xen" {
		t.Fatalf("describe %+v", d)
	}
	b, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(b, []byte(`"transport":"xen"`)) {
		t.Fatalf("wire form %s", b)
	}
	w.ring.queues[0].running = false
	if d := w.describe().Describe; d.Ring || d.Transport != "" {
		t.Fatalf("stopped rings: describe %+v", d)
	}
}

// A CD-ROM drive with no disc: no sectors, read-only, and the ring still
// connects (a frontend sees an empty drive, not a failed device).
func TestWorkerEmptyMedium(t *testing.T) {
	p := startTestWorker(t)
	rep, err := p.Call(ctx(t), Request{Op: OpOpen, Name: "cd"})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Size != 0 {
		t.Fatalf("empty drive: size %d", rep.Size)
	}
	f, err := frontend.New(frontend.Options{Protocol: blkif.X86_64})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	mem, kick, notify := f.BackendFDs()
	if _, err := p.Call(ctx(t), Request{Op: OpConnect, Transport: "local",
		Protocol: "x86_64-abi", RingRefs: f.RingRefs()}, mem, kick, notify); err != nil {
		t.Fatal(err)
	}
	if err := f.Connect(0, 512, true); err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(make([]byte, 512), 0); err == nil {
		t.Fatal("a read of an empty drive succeeded")
	}
	rep, err = p.Call(ctx(t), Request{Op: OpDescribe})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Describe.ReadOnly {
		t.Fatalf("empty drive described as writable: %+v", rep.Describe)
	}
	if _, err := p.Call(ctx(t), Request{Op: OpFlush}); err != nil {
		t.Fatal(err)
	}
}

// A paused worker told to close ends cleanly: the held gate is released
// onto a closed image, and there is nothing left to flush.
func TestWorkerPausedClose(t *testing.T) {
	img := filepath.Join(t.TempDir(), "a.raw")
	if err := formats.Create("raw", img, formats.CreateOptions{Size: 8 << 20}); err != nil {
		t.Fatal(err)
	}
	p := startTestWorker(t)
	for _, req := range []Request{{Op: OpOpen, Name: "a", Format: "raw", Path: img}, {Op: OpPause}} {
		if rep, err := p.Call(ctx(t), req); err != nil {
			t.Fatalf("%s: %+v %v", req.Op, rep, err)
		}
	}
	if rep, err := p.Call(ctx(t), Request{Op: OpStats}); err != nil || !rep.Paused {
		t.Fatalf("stats while paused: %+v %v", rep, err)
	}
	if err := p.Close(ctx(t)); err != nil {
		t.Fatalf("close while paused: %v", err)
	}
	waitCleanExit(t, p)
}
