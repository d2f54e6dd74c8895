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

// A guest disk's ring that either end gives up on (the daemon's own
// frontend, on responses it never asked for; the worker, on a producer
// index a ring ahead) shows in the device's phase and error (and the
// backend's error key) until the daemon, by itself, has started the
// frontend over; the guest view then serves again with every write it
// acknowledged before. A ring that breaks again soon waits longer.
func TestLocalRingGivenUp(t *testing.T) {
	qemuIO := oracle.Require(t, "qemu-io")
	for _, tc := range []struct {
		name string
		idx  ringfault.Index
		want []string // in the error while closing
	}{
		{"frontend", ringfault.Responses, []string{"ring stopped: local frontend gave up", "rsp_prod"}},
		{"worker", ringfault.Requests, []string{"ring stopped: ", "hostile"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, true)
			k := Key{KindVBD3, 3, 51728}
			if err := WriteDevice(context.Background(), h.xs, DeviceSpec{Key: k, Name: "g", Format: "raw",
				Path: h.image("g.raw"), Mode: "w", Vdev: "xvdb", Source: "attach"}); err != nil {
				t.Fatal(err)
			}
			be, fe := k.BackendPath(0), k.FrontendPath()
			connected := map[string]string{be + "/state": "4", fe + "/state": "4",
				be + "/" + keyPhase: PhaseConnected, be + "/" + keyError: "", be + "/error": ""}
			h.waitFor("connected", connected)
			uri := h.read(be + "/" + keyExport)
			pid := h.read(be + "/" + keyWorkerPid)
			qemu := func(cmd string) {
				t.Helper()
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				if out, err := exec.CommandContext(ctx, qemuIO, "-f", "raw", uri, "-c", cmd).CombinedOutput(); err != nil {
					t.Fatalf("qemu-io %s: %v\n%s", cmd, err, out)
				}
			}
			qemu("write -P 0x5a 0 256k")

			var gaps []time.Duration
			for round := range 2 {
				if n, err := ringfault.BreakRings(os.Getpid(), tc.idx); err != nil || n != 1 {
					t.Fatalf("round %d: BreakRings: %d rings, %v", round, n, err)
				}
				deadline := time.Now().Add(10 * time.Second)
				for h.read(be+"/"+keyPhase) != PhaseClosing {
					if time.Now().After(deadline) {
						t.Fatalf("round %d: phase %q, error %q: the failure never showed", round, h.read(be+"/"+keyPhase), h.read(be+"/"+keyError))
					}
					time.Sleep(5 * time.Millisecond)
				}
				closing := time.Now()
				for _, key := range []string{keyError, "error"} {
					msg := h.read(be + "/" + key)
					for _, w := range tc.want {
						if !strings.Contains(msg, w) {
							t.Errorf("round %d: %s = %q while closing, want %q in it", round, key, msg, w)
						}
					}
				}
				h.waitFor("reconnected", connected)
				gaps = append(gaps, time.Since(closing))
				if got := h.read(be + "/" + keyExport); got != uri {
					t.Fatalf("guest view moved from %s to %s", uri, got)
				}
				if got := h.read(be + "/" + keyWorkerPid); got != pid {
					t.Errorf("worker %s replaced by %s; only the ring had to reconnect", pid, got)
				}
				qemu("read -P 0x5a 0 256k")
			}
			// The second restart within a minute waits 1.5 s, the first 1 s.
			if gaps[1] < 1400*time.Millisecond {
				t.Errorf("closed for %v, then %v: a ring that breaks again should wait longer", gaps[0], gaps[1])
			}
			t.Logf("closed for %v, then %v", gaps[0], gaps[1])
			qemu("write -P 0x6b 128k 256k")
			qemu("read -P 0x5a 0 128k")
			qemu("read -P 0x6b 128k 256k")
		})
	}
}
