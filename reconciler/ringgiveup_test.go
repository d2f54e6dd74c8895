package reconciler

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/oracle"
	"github.com/blktap-go/blktap/internal/ringfault"
)

// The daemon's own frontend gives up on a ring whose backend answered
// requests it never made: the device says so in its phase and error (and
// the backend's error key) until the daemon, by itself, has started the
// frontend over and the guest view serves again with every write it
// acknowledged before.
func TestLocalFrontendGivesUp(t *testing.T) {
	qemuIO := oracle.Require(t, "qemu-io")
	h := newHarness(t, true)
	k := Key{KindVBD3, 3, 51728}
	if err := WriteDevice(context.Background(), h.xs, DeviceSpec{Key: k, Name: "g", Format: "raw",
		Path: h.image("g.raw"), Mode: "w", Vdev: "xvdb", Source: "attach"}); err != nil {
		t.Fatal(err)
	}
	be, fe := k.BackendPath(0), k.FrontendPath()
	h.waitFor("connected", map[string]string{be + "/state": "4", fe + "/state": "4", be + "/" + keyPhase: PhaseConnected})
	uri := h.read(be + "/" + keyExport)
	qemu := func(cmd string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		out, err := exec.CommandContext(ctx, qemuIO, "-f", "raw", uri, "-c", cmd).CombinedOutput()
		return string(out), err
	}
	if out, err := qemu("write -P 0x5a 0 256k"); err != nil {
		t.Fatalf("write before: %v\n%s", err, out)
	}

	if n, err := ringfault.BreakRings(os.Getpid()); err != nil || n != 1 {
		t.Fatalf("BreakRings: %d rings, %v", n, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for h.read(be+"/"+keyPhase) != PhaseClosing {
		if time.Now().After(deadline) {
			t.Fatalf("phase %q, error %q: the failure never showed", h.read(be+"/"+keyPhase), h.read(be+"/"+keyError))
		}
		time.Sleep(5 * time.Millisecond)
	}
	for _, key := range []string{keyError, "error"} {
		if msg := h.read(be + "/" + key); !strings.Contains(msg, "gave up") || !strings.Contains(msg, "rsp_prod") {
			t.Errorf("%s = %q while closing, want the frontend's reason", key, msg)
		}
	}

	h.waitFor("reconnected", map[string]string{be + "/state": "4", fe + "/state": "4",
		be + "/" + keyPhase: PhaseConnected, be + "/" + keyError: "", be + "/error": ""})
	if got := h.read(be + "/" + keyExport); got != uri {
		t.Fatalf("guest view moved from %s to %s", uri, got)
	}
	if out, err := qemu("read -P 0x5a 0 256k"); err != nil {
		t.Fatalf("read after the reconnect: %v\n%s", err, out)
	}
	if out, err := qemu("write -P 0x6b 128k 256k"); err != nil {
		t.Fatalf("write after the reconnect: %v\n%s", err, out)
	}
	if out, err := qemu("read -P 0x5a 0 128k"); err != nil {
		t.Fatalf("read back: %v\n%s", err, out)
	}
	if out, err := qemu("read -P 0x6b 128k 256k"); err != nil {
		t.Fatalf("read back: %v\n%s", err, out)
	}
}
