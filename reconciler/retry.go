package reconciler

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/blktap-go/blktap/tapengine/worker"
)

// A reconcile pass ends in one place, endPass, however it ended: the
// status is written there, from the pass's last observation, and a pass
// that failed (observing, an action's effect; a pass
// out of rounds, a panic) is requeued as retryPolicy decides:
//
//   - a *retryAt error: at that time (an effect waiting out a backoff of
//     its own, such as a worker's restart);
//   - a terminal error: not until the device's params change (or `blktap
//     retry`); the status says why;
//   - any other error: after the device's backoff, the status says
//     retrying.

// stepObserve names the one step that is not an action, for stepError.step.
const stepObserve = "observe"

// stepError is a failed step of a reconcile pass.
type stepError struct {
	step   string // the action's name, or stepObserve
	action bool   // step is an action
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

// requeue is when a device's key comes back.
type requeue int

const (
	requeueNever requeue = iota // until something changes
	requeueNow
	requeueLater // after the wait retryPolicy returns
)

// endPass ends a reconcile pass: the status says where the device is
// (snap nil: nothing was observed) and a failed pass is requeued.
func (d *Daemon) endPass(ctx context.Context, dev *device, snap *snapshot, failure error, log *slog.Logger) {
	when, wait := requeueNever, time.Duration(0)
	if failure != nil {
		when, wait = d.retryPolicy(dev, snap, failure, log)
	}
	if snap != nil {
		d.writeStatus(ctx, dev, *snap)
	}
	switch when {
	case requeueNow:
		d.q.Add(dev.key)
	case requeueLater:
		d.q.AddAfter(dev.key, wait)
	}
	if d.opts.hooks != nil {
		var s snapshot
		if snap != nil {
			s = *snap
		}
		d.opts.hooks.passEnded(dev.key, snap, dev.actual(s), failure)
	}
}

// retryPolicy records a failure in the device (its status shows it) and
// says when to try again, as the policy above says.
func (d *Daemon) retryPolicy(dev *device, snap *snapshot, failure error, log *slog.Logger) (requeue, time.Duration) {
	var se *stepError
	if !errors.As(failure, &se) {
		se = &stepError{err: failure}
	}
	var at *retryAt
	switch {
	case errors.As(se.err, &at):
		return requeueLater, time.Until(at.t)
	case snap == nil:
		log.Warn(se.step, "err", se.err)
		return requeueLater, dev.retry.bo.NextBackOff()
	case isTerminal(se.err):
		log.Error("terminal: not retrying until the device's params change", "action", se.step, "err", se.err)
		dev.st.failed, dev.st.failedParams = se.err.Error(), snap.Params
		if snap.awaitsHotplug() {
			return requeueNow, 0 // Plan still owes the toolstack its InitWait
		}
		return requeueNever, 0
	}
	dev.st.lastErr = se.err.Error()
	wait := dev.retry.bo.NextBackOff()
	if se.action {
		log.Warn("retrying", "action", se.step, "err", se.err, "in", wait)
	}
	return requeueLater, wait
}
