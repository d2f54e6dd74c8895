package reconciler

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// convergeCost declares n domain-0 disks at once on a fresh daemon (its
// resync off, so only the disks' own work counts) and returns, per disk,
// the xenstore requests the daemon sent, the watch events it received and
// the reconcile passes it ran until every disk was connected and the
// queue quiet.
func convergeCost(t *testing.T, n int) (requests, events, passes float64) {
	h := newDaemonHarness(t, false)
	ctx := context.Background()
	req0, ev0 := h.proxy.counts()
	_, gets0 := h.d.q.quiet()
	keys := make([]Key, n)
	for i := range keys {
		keys[i] = Key{KindVBD3, 0, uint32(1<<28 | (i+1)<<8)}
		name := fmt.Sprintf("c%d", i)
		spec := DeviceSpec{Key: keys[i], Name: name, Format: "raw", Path: h.image(name + ".raw"), Mode: "w", Vdev: fmt.Sprint(keys[i].Devid), Source: "attach"}
		if err := WriteDevice(ctx, h.xs, spec); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(3 * time.Minute)
	for _, k := range keys {
		for h.read(k.BackendPath(0)+"/"+keyPhase) != PhaseConnected {
			if time.Now().After(deadline) {
				t.Fatalf("%s not connected after 3 minutes (n=%d)", k, n)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	// Quiet twice in a row with no pass between: nothing left to do.
	for prev := uint64(0); ; time.Sleep(200 * time.Millisecond) {
		idle, gets := h.d.q.quiet()
		if idle && gets == prev {
			break
		}
		prev = gets
	}
	req, ev := h.proxy.counts()
	_, gets := h.d.q.quiet()
	f := float64(n)
	return float64(req-req0) / f, float64(ev-ev0) / f, float64(gets-gets0) / f
}

// TestConvergenceCostLinear (issue 18 item 4): what the daemon asks of
// xenstore, the watch events it takes and the passes it runs to bring a
// disk up stay the same per disk for 16 disks as for 2. A step that
// walks every disk (a rescan per device, a watch on a whole directory
// per device, a listing that grows with the fleet) makes the per-disk
// cost grow with n and fails this; it counts, so a slow host cannot.
func TestConvergenceCostLinear(t *testing.T) {
	old := resyncEvery
	resyncEvery = time.Hour
	t.Cleanup(func() { resyncEvery = old })
	r2, e2, p2 := convergeCost(t, 2)
	r16, e16, p16 := convergeCost(t, 16)
	t.Logf("per disk: n=2: %.1f requests, %.1f events, %.1f passes; n=16: %.1f, %.1f, %.1f", r2, e2, p2, r16, e16, p16)
	// Merged watch events make the per-disk figures differ a little
	// from run to run; a cost that grows with n grows by far more.
	for _, c := range []struct {
		what      string
		two, many float64
	}{{"xenstore requests", r2, r16}, {"watch events", e2, e16}, {"reconcile passes", p2, p16}} {
		if c.many > 1.5*c.two+2 {
			t.Errorf("%s per disk: %.1f for 16 disks, %.1f for 2: superlinear", c.what, c.many, c.two)
		}
	}
}
