package reconciler

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/blktap-go/blktap/xenstore"
)

// The YAML's changes to a device's declaration (detach it, reconnect it
// to another image) take a while: the daemon drains and closes the disk
// before the directories go. Reloads come faster than that, so each key
// has at most one such change running, and the changes asked for
// meanwhile merge into one that runs next, from the desired state as it
// is then. Two detaches of one device never overlap, and a detach queued
// before the disk came back cannot take it away again.

// declOp is one change to a device's declaration.
type declOp struct {
	spec *DeviceSpec // the declaration wanted; nil: no device
	// reconnect: the disk changed (image, format, mode); a device that
	// xenstore declares differently is unplugged and declared anew.
	reconnect bool
	// force: unplug and declare anew even when the declaration matches
	// (a device left offline and Closed: nothing else brings it back).
	force bool
}

// merge folds a newer request into a pending one: the newer declaration
// wins, and a reconnect asked for by either still happens if xenstore
// differs from the declaration when its turn comes.
func (op declOp) merge(newer declOp) declOp {
	if newer.spec == nil {
		return newer
	}
	if op.spec != nil {
		newer.reconnect = newer.reconnect || op.reconnect
		newer.force = newer.force || op.force
	}
	return newer
}

type declQueue struct {
	running bool
	next    *declOp
}

// declare runs op for k now, or after the change running for k, merged
// with whatever else was asked for k meanwhile.
func (d *Daemon) declare(ctx context.Context, k Key, op declOp) {
	d.mu.Lock()
	if d.decl == nil {
		d.decl = map[Key]*declQueue{}
	}
	dq := d.decl[k]
	if dq == nil {
		dq = &declQueue{}
		d.decl[k] = dq
	}
	if dq.next != nil {
		op = dq.next.merge(op)
	}
	dq.next = &op
	if dq.running {
		d.mu.Unlock()
		return
	}
	dq.running = true
	d.mu.Unlock()
	go func() {
		for {
			d.mu.Lock()
			next := dq.next
			dq.next = nil
			if next == nil {
				dq.running = false
				delete(d.decl, k)
				d.mu.Unlock()
				return
			}
			d.mu.Unlock()
			octx, cancel := context.WithTimeout(ctx, 2*time.Minute)
			d.runDecl(octx, k, *next)
			cancel()
			d.q.Add(k)
		}
	}()
}

// declaring reports whether a change to k's declaration runs or waits.
func (d *Daemon) declaring(k Key) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.decl[k] != nil
}

func (d *Daemon) runDecl(ctx context.Context, k Key, op declOp) {
	log := d.log.With("device", k.String())
	be := d.backendPath(k)
	params, err := d.xs.Read(ctx, be+"/params")
	present := err == nil
	if err != nil && !errors.Is(err, xenstore.ErrNotFound) {
		log.Error("declare: read", "err", err)
		return
	}
	if op.spec == nil {
		if !present {
			return
		}
		log.Info("detaching: the disk left the desired state")
		if err := Detach(ctx, d.xs, k); err != nil {
			log.Error("detach", "err", err)
		}
		return
	}
	log = log.With("disk", op.spec.Name)
	if present {
		mode, _ := d.xs.Read(ctx, be+"/mode")
		differs := params != op.spec.Params() || mode != op.spec.Mode
		if !op.force && !(op.reconnect && differs) {
			return
		}
		if op.force {
			log.Warn("device left offline and Closed with no worker: declaring it anew")
		} else {
			log.Info("disk changed: reconnecting", "params", op.spec.Params(), "mode", op.spec.Mode)
		}
		if err := Detach(ctx, d.xs, k); err != nil {
			log.Error("reconnect: detach", "err", err)
			return
		}
	}
	if err := WriteDevice(ctx, d.xs, *op.spec); err != nil && !errors.Is(err, ErrExists) {
		log.Error("declare device in xenstore", "err", err)
	}
}

// stuckGrace is how long a desired device may sit offline and Closed with
// no worker before the daemon declares it anew: long enough for a
// toolstack's or `blktap detach`'s removal to finish first.
var stuckGrace = 10 * time.Second

// noticeStuck converges a YAML disk whose device was left offline and
// Closed, with no worker and nothing running to change it: an unplug that
// nobody finishes.
func (d *Daemon) noticeStuck(ctx context.Context, dev *device, s snapshot, log *slog.Logger) {
	stuck := s.Present && !s.Online && s.Backend == StateClosed && dev.worker.proc == nil && dev.rings.lf == nil
	if !stuck || d.declaring(dev.key) || d.conflict(dev.key) != "" {
		dev.st.stuckSince = time.Time{}
		return
	}
	disk, ok := d.desiredFor(dev.key)
	if !ok {
		dev.st.stuckSince = time.Time{}
		return
	}
	if dev.st.stuckSince.IsZero() {
		dev.st.stuckSince = time.Now()
	}
	if wait := time.Until(dev.st.stuckSince.Add(stuckGrace)); wait > 0 {
		d.q.AddAfter(dev.key, wait)
		return
	}
	dev.st.stuckSince = time.Time{}
	spec := yamlSpec(dev.key, disk)
	log.Warn("YAML disk offline and Closed with no worker since the grace ran out: converging", "disk", disk.Name, "grace", stuckGrace)
	d.declare(ctx, dev.key, declOp{spec: &spec, force: true})
}
