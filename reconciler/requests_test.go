package reconciler

import (
	"context"
	"errors"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/oracle"
)

// Operators' requests go through the device's reconciling goroutine:
// answered when there is a worker, refused when there is none, withdrawn
// when the caller gives up first, and a snapshot's new params are the
// worker's own, not a change that restarts it.
func TestOperatorRequests(t *testing.T) {
	qemuImg := oracle.Require(t, "qemu-img")
	h := newHarness(t, true)
	// Bounded: a request nobody answers fails the test instead of hanging it.
	ctx, stop := context.WithTimeout(context.Background(), time.Minute)
	defer stop()

	nobody := Key{KindVBD3, 0, 51900}
	start := time.Now()
	err := h.d.request(ctx, nobody, RequestPause, DeviceOp{})
	if err == nil || !strings.Contains(err.Error(), "no running worker") {
		t.Fatalf("pause of a device that does not exist: %v", err)
	}
	if waited := time.Since(start); waited > 10*time.Second {
		t.Errorf("the refusal took %v", waited)
	}

	k := Key{KindVBD3, 0, 51712}
	if err := WriteDevice(ctx, h.xs, DeviceSpec{Key: k, Name: "rq", Format: "raw", Path: h.image("rq.raw"), Mode: "w", Vdev: "xvdb", Source: "attach"}); err != nil {
		t.Fatal(err)
	}
	h.waitPhase(k, PhaseConnected, "")
	be := k.BackendPath(0)
	pid := h.read(be + "/" + keyWorkerPid)
	if err := h.d.request(ctx, k, RequestPause, DeviceOp{}); err != nil {
		t.Fatal(err)
	}
	h.waitPhase(k, PhasePaused, "")
	if err := h.d.request(ctx, k, RequestResume, DeviceOp{}); err != nil {
		t.Fatal(err)
	}
	h.waitPhase(k, PhaseConnected, "")

	overlay := filepath.Join(h.dir, "rq.qcow2")
	if err := h.d.request(ctx, k, RequestSnapshot, DeviceOp{Path: overlay}); err != nil {
		t.Fatal(err)
	}
	if got := h.read(be + "/params"); got != "qcow2:"+overlay {
		t.Errorf("params after the snapshot: %q", got)
	}
	info, err := exec.Command(qemuImg, "info", "-U", "--output=json", overlay).CombinedOutput()
	if out := string(info); err != nil || !strings.Contains(out, `"backing-filename": "`+filepath.Join(h.dir, "rq.raw")+`"`) {
		t.Errorf("the overlay's backing file is not the old image (%v):\n%s", err, out)
	}
	// Many passes later (the harness rescans every 50 ms), the worker that
	// switched to the overlay is still the one serving.
	time.Sleep(500 * time.Millisecond)
	h.waitPhase(k, PhaseConnected, "")
	if got := h.read(be + "/" + keyWorkerPid); got != pid {
		t.Errorf("worker %s replaced by %s after the snapshot", pid, got)
	}

	gone, cancel := context.WithCancel(ctx)
	cancel()
	if err := h.d.request(gone, k, RequestPause, DeviceOp{}); !errors.Is(err, context.Canceled) {
		t.Errorf("a request whose caller gave up: %v", err)
	}
	h.waitPhase(k, PhaseConnected, "")
}

// A request its caller withdrew is never answered; the others keep
// their order.
func TestRequestWithdraw(t *testing.T) {
	d := &Daemon{requests: map[Key][]*opRequest{}}
	k := Key{KindVBD3, 1, 51712}
	a, b := &opRequest{kind: RequestPause}, &opRequest{kind: RequestResume}
	d.requests[k] = []*opRequest{a, b}
	if d.nextRequest(k) != a || !d.withdraw(k, a) || d.nextRequest(k) != b {
		t.Fatal("withdrawing the oldest request does not leave the next one first")
	}
	if d.withdraw(k, a) {
		t.Error("a request withdrawn twice")
	}
	if !d.withdraw(k, b) || d.nextRequest(k) != nil || len(d.requests) != 0 {
		t.Errorf("queue left after withdrawing everything: %v", d.requests)
	}
}
