package reconciler

// hooks let the in-process daemon harness (harness_test.go) follow a
// running daemon: which daemon Run built, what each effect returned, how
// each reconcile pass ended. Options.hooks is unexported, so only this
// package's tests set it; every method is a no-op on a nil *hooks.
type hooks struct {
	onRunning func(d *Daemon)
	onApplied func(k Key, act Action, err error)
	// onPassEnded: o is the pass's last observation (nil when it had
	// none), a what the daemon runs once the pass is over.
	onPassEnded func(k Key, o *Observed, a Actual, failure error)
}

func (h *hooks) running(d *Daemon) {
	if h != nil && h.onRunning != nil {
		h.onRunning(d)
	}
}

func (h *hooks) applied(k Key, act Action, err error) {
	if h != nil && h.onApplied != nil {
		h.onApplied(k, act, err)
	}
}

func (h *hooks) passEnded(k Key, snap *snapshot, a Actual, failure error) {
	if h == nil || h.onPassEnded == nil {
		return
	}
	var o *Observed
	if snap != nil {
		c := snap.Observed
		o = &c
	}
	h.onPassEnded(k, o, a, failure)
}
