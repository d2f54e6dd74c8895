package reconciler

import (
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/blktap-go/blktap/tapengine/worker"
)

// Every action Plan can emit has an effect.
func TestEveryActionHasAnEffect(t *testing.T) {
	for k := range actionNames {
		if waitEffects[k] == nil && (int(k) >= len(effects) || effects[k] == nil) {
			t.Errorf("%v has no effect", k)
		}
	}
	if err := (&Daemon{}).apply(t.Context(), nil, snapshot{}, Action{Kind: 99}, nil); err == nil {
		t.Error("an unknown action applied without error")
	}
}

func TestDeviceStatus(t *testing.T) {
	dom0 := snapshot{Observed: Observed{Present: true, Online: true, Params: "aio:/img/a.raw",
		Backend: StateConnected, Frontend: StateConnected, Domain0: true, Export: true}}
	running := statusNotes{worker: true, workerPid: 42, exportServed: true, exportURI: "nbd+unix:///?socket=/s", name: "a"}
	for _, tc := range []struct {
		name      string
		s         snapshot
		n         statusNotes
		phase     string
		errMsg    string
		errorKey  string // "-": no error key
		export    string
		workerPid string
	}{
		{"connected", dom0, running, PhaseConnected, "", "-", "nbd+unix:///?socket=/s", "42"},
		{"retrying", dom0, with(running, func(n *statusNotes) { n.lastErr = "boom" }), PhaseRetrying, "boom", "-", "nbd+unix:///?socket=/s", "42"},
		{"failed", dom0, with(running, func(n *statusNotes) { n.worker, n.failed = false, "no image" }), PhaseFailed, "no image", "no image", "nbd+unix:///?socket=/s", ""},
		{"ring lost", dom0, with(running, func(n *statusNotes) { n.ringLost = "bad index" }), PhaseConnected, "ring stopped: bad index", "ring stopped: bad index", "nbd+unix:///?socket=/s", "42"},
		{"error cleared", dom0, with(running, func(n *statusNotes) { n.hadError = true }), PhaseConnected, "", "", "nbd+unix:///?socket=/s", "42"},
		{"paused", dom0, with(running, func(n *statusNotes) { n.paused = true }), PhasePaused, "", "-", "nbd+unix:///?socket=/s", "42"},
		{"closed", with(dom0, func(s *snapshot) { s.Backend = StateClosed }), statusNotes{conflict: "claimed twice"}, PhaseClosed, "claimed twice", "-", "", ""},
	} {
		got := deviceStatus(tc.s, tc.n)
		errorKey, had := got["error"]
		if !had {
			errorKey = "-"
		}
		if got[keyPhase] != tc.phase || got[keyError] != tc.errMsg || errorKey != tc.errorKey ||
			got[keyExport] != tc.export || got[keyWorkerPid] != tc.workerPid || got[keyImageFormat] != "raw" || got[keyImagePath] != "/img/a.raw" {
			t.Errorf("%s: status %v", tc.name, got)
		}
	}
}

func with[T any](v T, f func(*T)) T {
	f(&v)
	return v
}

func TestStatusChanges(t *testing.T) {
	last := map[string]string{keyPhase: PhaseWaiting, keyError: "", "logged-uri": "x"}
	want := map[string]string{keyPhase: PhaseConnected, keyError: "", keyExport: ""}
	got := statusChanges(last, want)
	if len(got) != 2 || got[keyPhase] != PhaseConnected || got[keyExport] != "" {
		t.Errorf("changes %v, want phase and the never written export", got)
	}
	if got := statusChanges(want, want); len(got) != 0 {
		t.Errorf("changes %v between equal statuses", got)
	}
}

func TestRetryPolicy(t *testing.T) {
	d := &Daemon{}
	log := slog.New(slog.DiscardHandler)
	snap := &snapshot{Observed: Observed{Present: true, Params: "aio:/a"}}
	for _, tc := range []struct {
		name    string
		snap    *snapshot
		err     error
		when    requeue
		failed  string
		lastErr string
	}{
		{"wait asked for", snap, &stepError{step: "start-worker", action: true, err: retryIn(time.Hour)}, requeueLater, "", ""},
		{"terminal", snap, &stepError{step: "start-worker", action: true, err: terminal(errors.New("bad mode"))}, requeueNever, "bad mode", ""},
		{"terminal worker error", snap, &stepError{step: "start-worker", err: &worker.Error{Op: "open", Msg: "no", Class: "invalid"}}, requeueNever, "open: no", ""},
		{"terminal awaiting hotplug", with(*snap, func(s *snapshot) { s.HotplugScript = true }).ptr(), terminal(errors.New("x")), requeueNow, "x", ""},
		{"transient", snap, &stepError{step: "serve-export", action: true, err: errors.New("EAGAIN")}, requeueLater, "", "EAGAIN"},
		{"not observed", nil, &stepError{step: stepObserve, err: errors.New("EIO")}, requeueLater, "", ""},
	} {
		dev := d.newDevice(Key{KindVBD3, 1, 51712})
		when, wait := d.retryPolicy(dev, tc.snap, tc.err, log)
		if when != tc.when || dev.st.failed != tc.failed || dev.st.lastErr != tc.lastErr {
			t.Errorf("%s: requeue %v failed %q lastErr %q, want %v %q %q", tc.name, when, dev.st.failed, dev.st.lastErr, tc.when, tc.failed, tc.lastErr)
		}
		if tc.name == "wait asked for" && (wait < 59*time.Minute || wait > time.Hour) {
			t.Errorf("%s: wait %v, want the hour asked for", tc.name, wait)
		}
		if tc.failed != "" && dev.st.failedParams != tc.snap.Params {
			t.Errorf("%s: failed for params %q", tc.name, dev.st.failedParams)
		}
	}
}

func (s snapshot) ptr() *snapshot { return &s }
