package reconciler

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/blktap-go/blktap/tapengine/worker"
)

// An operator's request (the API's pause, resume, snapshot) is desired
// state like any other: the handler queues it for the device and the
// device's key, the reconciling goroutine, which alone touches the
// device, observes it, Plan decides what answers it, and the effect
// answers. The handler waits for that answer.

// opRequest is one operator request waiting for its device.
type opRequest struct {
	kind         Request
	format, path string     // resume: a new image; snapshot: the overlay
	name         string     // snapshot: NEWFILE as typed (an rbd disk's snapshot or clone name)
	done         chan error // buffered: the effect never waits for the handler
}

// deviceView is what the daemon publishes of a device for readers other
// than its reconciling goroutine (the API): a copy, taken under d.mu.
type deviceView struct {
	proc   *worker.Process
	paused bool
}

// publish makes dev's current state what the API sees of it.
func (d *Daemon) publish(dev *device) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if dev.worker.proc == nil {
		delete(d.views, dev.key)
		return
	}
	d.views[dev.key] = deviceView{proc: dev.worker.proc, paused: dev.ctl.paused}
}

// request queues an operator request for k and waits for its answer.
func (d *Daemon) request(ctx context.Context, k Key, kind Request, op DeviceOp) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("device %s: %w", k, err) // nobody waits for the answer
	}
	r := &opRequest{kind: kind, format: op.Format, path: op.Path, name: op.Name, done: make(chan error, 1)}
	d.mu.Lock()
	d.requests[k] = append(d.requests[k], r)
	d.mu.Unlock()
	d.q.Add(k)
	select {
	case err := <-r.done:
		return err
	case <-ctx.Done():
		if d.withdraw(k, r) {
			return fmt.Errorf("device %s: %w", k, ctx.Err())
		}
		// Taken already: the device answers it, for nobody.
		return fmt.Errorf("device %s: %w (the request goes on)", k, ctx.Err())
	}
}

// nextRequest is the oldest request waiting for k, or nil.
func (d *Daemon) nextRequest(k Key) *opRequest {
	d.mu.Lock()
	defer d.mu.Unlock()
	if rs := d.requests[k]; len(rs) > 0 {
		return rs[0]
	}
	return nil
}

// withdraw takes r back from k's queue; false: it was taken already.
func (d *Daemon) withdraw(k Key, r *opRequest) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	rs := d.requests[k]
	for i, x := range rs {
		if x == r {
			d.requests[k] = append(rs[:i:i], rs[i+1:]...)
			if len(d.requests[k]) == 0 {
				delete(d.requests, k)
			}
			return true
		}
	}
	return false
}

// answer takes the request the observation saw (nothing, if its handler
// withdrew it meanwhile) and answers it with what do returns. A request's
// failure is its own, not the device's: the pass goes on.
func (d *Daemon) answer(dev *device, s snapshot, do func(*opRequest) error) error {
	r := s.request
	if r == nil || !d.withdraw(dev.key, r) {
		return nil
	}
	err := errors.New("internal error")
	defer func() { r.done <- err }()
	err = do(r)
	d.publish(dev)
	return nil
}

// refuseAll answers every request waiting for k: the device is not the
// daemon's to serve.
func (d *Daemon) refuseAll(k Key, why string) {
	d.mu.Lock()
	rs := d.requests[k]
	delete(d.requests, k)
	d.mu.Unlock()
	for _, r := range rs {
		r.done <- fmt.Errorf("device %s %s", k, why)
	}
}

// refuseRequest answers a request the device has no worker for.
func (d *Daemon) refuseRequest(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	return d.answer(dev, s, func(*opRequest) error {
		return fmt.Errorf("device %s has no running worker", dev.key)
	})
}
