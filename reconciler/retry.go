package reconciler

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/blktap-go/blktap/tapengine/worker"
)

// A reconcile pass that cannot finish ends in one place, retryFailed,
// whatever failed: observing, an action's effect, the kernel device, or nothing
// (a pass that ran out of rounds, a panic). It decides when the key comes
// back and what the status says meanwhile:
//
//   - a *retryAt error: at that time (an effect waiting out a backoff of
//     its own, such as a worker's restart);
//   - a terminal error: not until the device's params change (or `blktap
//     retry`); the status says why;
//   - any other error: after the device's backoff, the status says
//     retrying.

// Steps that are not actions, for stepError.step.
const (
	stepObserve      = "observe"
	stepKernelDevice = "kernel-device"
)

// stepError is a failed step of a reconcile pass.
type stepError struct {
	step   string    // the action's name, or stepObserve, stepKernelDevice
	action bool      // step is an action
	snap   *snapshot // what the pass observed; nil when it observed nothing
	err    error
}

func (e *stepError) Error() string { return e.step + ": " + e.err.Error() }
func (e *stepError) Unwrap() error { return e.err }

type retryAt struct{ t time.Time }

func (r *retryAt) Error() string { return "retry at " + r.t.Format(time.RFC3339) }

func retryIn(d time.Duration) *retryAt { return &retryAt{time.Now().Add(d)} }

type terminalError struct{ err error }

func (e *terminalError) Error() string { return e.err.Error() }
func (e *terminalError) Unwrap() error { return e.err }

func terminal(err error) error { return &terminalError{err} }

func isTerminal(err error) bool {
	var t *terminalError
	if errors.As(err, &t) {
		return true
	}
	var we *worker.Error
	return errors.As(err, &we) && we.Terminal()
}

// retryFailed requeues the device after a failed step, as the policy
// above says.
func (d *Daemon) retryFailed(ctx context.Context, dev *device, failure error, log *slog.Logger) {
	var se *stepError
	if !errors.As(failure, &se) {
		se = &stepError{err: failure}
	}
	var at *retryAt
	var wait time.Duration
	switch {
	case errors.As(se.err, &at):
		wait = time.Until(at.t)
	case se.snap == nil:
		wait = dev.bo.NextBackOff()
		log.Warn(se.step, "err", se.err)
	case isTerminal(se.err):
		log.Error("terminal: not retrying until the device's params change", "action", se.step, "err", se.err)
		dev.failed, dev.failedParams = se.err.Error(), se.snap.Params
		d.writeStatus(ctx, dev, *se.snap)
		if se.snap.awaitsHotplug() {
			d.q.Add(dev.key) // Plan still owes the toolstack its InitWait
		}
		return
	default:
		dev.lastErr = se.err.Error()
		wait = dev.bo.NextBackOff()
		if se.action {
			log.Warn("retrying", "action", se.step, "err", se.err, "in", wait)
		}
	}
	if se.snap != nil {
		d.writeStatus(ctx, dev, *se.snap)
	}
	d.q.AddAfter(dev.key, wait)
}
