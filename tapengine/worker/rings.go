package worker

import (
	"context"
	"fmt"
	"os"
	"sync"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/local"
	"github.com/blktap-go/blktap/tapengine/ring"
	"github.com/blktap-go/blktap/tapengine/xen"
)

// ringState is the disk's rings: one per queue (blkif multi-queue), all
// serving the same image, their counters added up.
type ringState struct {
	mu     sync.Mutex
	queues map[int]*queueState
	err    error    // why a ring stopped on its own
	watch  *os.File // where that is reported as it happens (watch.go); nil: nowhere
	stats  ring.Stats
}

type queueState struct {
	cancel    context.CancelFunc
	done      chan struct{}
	running   bool
	transport string // Request.Transport of the connect
}

// OpenXen opens what a ring over the "xen" transport maps the guest's
// pages and binds its event channel with: /dev/xen/gntdev and evtchn. A
// test binary that runs workers on a machine without Xen sets it, before
// Main, to a device that plays the hypervisor.
var OpenXen = xen.OpenDevice

// maxQueues bounds blkif multi-queue (Linux blkback allows one per CPU).
const maxQueues = 16

// running reports whether a queue's ring runs, and over which transport
// (the lowest running queue's, should queues ever differ).
func (r *ringState) running() (transport string, ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	low := -1
	for i, q := range r.queues {
		if q.running && (low < 0 || i < low) {
			low, transport = i, q.transport
		}
	}
	return transport, low >= 0
}

// connect starts serving one queue's ring over the transport the request
// names; the ring stops on its own only on a fault, recorded in w.ring.err
// for the daemon's next stats.
func (w *worker) connect(req *Request, fds []int) Reply {
	if w.img == nil {
		closeAll(fds)
		return fail(fmt.Errorf("%w: no image open", errInvalid))
	}
	proto, err := blkif.ParseProtocol(req.Protocol)
	if err != nil {
		closeAll(fds)
		return fail(fmt.Errorf("%w: %v", errInvalid, err))
	}
	if req.Queue < 0 || req.Queue >= maxQueues {
		closeAll(fds)
		return fail(fmt.Errorf("%w: queue %d (at most %d queues)", errInvalid, req.Queue, maxQueues))
	}
	w.ring.mu.Lock()
	if w.ring.queues == nil {
		w.ring.queues = map[int]*queueState{}
	}
	q := w.ring.queues[req.Queue]
	running := q != nil && q.running
	w.ring.mu.Unlock()
	if running {
		closeAll(fds)
		return fail(fmt.Errorf("%w: queue %d is already connected", errInvalid, req.Queue))
	}
	var t ring.Transport
	switch req.Transport {
	case "local":
		if len(fds) != 3 {
			closeAll(fds)
			return fail(fmt.Errorf("%w: the local transport wants 3 descriptors (memfd, kick, notify), got %d", errInvalid, len(fds)))
		}
		if t, err = local.Attach(fds[0], req.RingRefs, fds[1], fds[2]); err != nil {
			return fail(err)
		}
	case "xen":
		closeAll(fds)
		dev, err := OpenXen()
		if err != nil {
			return fail(fmt.Errorf("%w: %v", image.ErrUnsupported, err))
		}
		if t, err = xen.Attach(dev, xen.Options{
			Domid: req.Domid, RingRefs: req.RingRefs, EventChannel: req.EventChannel,
			PersistentGrants: req.Persistent, Logger: w.logger,
		}); err != nil {
			return fail(fmt.Errorf("%w: %v", errInvalid, err))
		}
	default:
		closeAll(fds)
		return fail(fmt.Errorf("%w: transport %q", errInvalid, req.Transport))
	}
	ctx, cancel := context.WithCancel(context.Background())
	qs := &queueState{cancel: cancel, done: make(chan struct{}), running: true, transport: req.Transport}
	w.ring.mu.Lock()
	w.ring.queues[req.Queue], w.ring.err = qs, nil
	w.ring.mu.Unlock()
	go w.serveQueue(ctx, qs, req.Queue, t, proto)
	w.logger.Info("worker: ring connected", "queue", req.Queue, "protocol", proto.String(), "refs", req.RingRefs)
	return Reply{OK: true}
}

// serveQueue serves one queue's ring until it stops: on the daemon's
// word (ctx), or on its own, a fault recorded and reported (watch.go).
func (w *worker) serveQueue(ctx context.Context, qs *queueState, queue int, t ring.Transport, proto blkif.Protocol) {
	defer close(qs.done)
	defer t.Close()
	opts := RingOptions(w.readOnly)
	opts.Logger, opts.Stats = w.logger.With("queue", queue), &w.ring.stats
	if w.format == "rbd" {
		// Each request is an OSD round trip: a batch's requests
		// overlap instead of waiting one after another on the loop.
		opts.Workers = 32
	}
	opts.Batch = w.uring
	err := ring.Serve(ctx, t, proto, w.io, opts)
	w.ring.mu.Lock()
	qs.running = false
	if err != nil && ctx.Err() == nil {
		w.ring.err = err
		w.ring.report(err)
	}
	w.ring.mu.Unlock()
	if err != nil && ctx.Err() == nil {
		w.logger.Error("worker: ring stopped", "queue", queue, "err", err)
	}
}

// RingOptions are what a worker serves a ring with; the daemon publishes
// the matching feature keys from them (ring.Options.Features).
func RingOptions(readOnly bool) ring.Options {
	return ring.Options{ReadOnly: readOnly, Discard: true, MaxIndirectSegments: 256, Persistent: true}
}

// stopRing stops every queue's ring; each drains, answers what it took
// and flushes.
func (w *worker) stopRing() {
	w.ring.mu.Lock()
	queues := w.ring.queues
	w.ring.queues = nil
	w.ring.mu.Unlock()
	for _, q := range queues {
		q.cancel()
	}
	for _, q := range queues {
		<-q.done
	}
}
