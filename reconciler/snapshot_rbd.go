package reconciler

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/formats/rbd"
	"github.com/blktap-go/blktap/internal/rbdspec"
	"github.com/blktap-go/blktap/tapengine/worker"
)

// snapshotClone is `blktap snapshot` for an rbd disk (snapshotEffect
// sends it here); any other disk gets an overlay file.
//
// The semantics are the overlay file's: the image as it was at the
// snapshot becomes the read-only base, and the disk goes on writing a
// copy-on-write child of it. Here the base is the protected snapshot
// IMAGE@NAME and the child an RBD clone of it (IMAGE-NAME beside the
// image unless named), so the data never leaves the cluster and no file
// on this host joins the disk's chain. IMAGE's head keeps the snapshot's
// contents as long as nothing else writes it.
func (d *Daemon) snapshotClone(ctx context.Context, dev *device, base string, r *opRequest, log *slog.Logger) error {
	if r.format != "" && r.format != "rbd" {
		return fmt.Errorf("%w: an rbd disk's snapshot is an RBD snapshot and clone, not a %s overlay (leave out -f)", formats.ErrUnsupported, r.format)
	}
	parent, err := rbdspec.Parse(base)
	if err != nil {
		return err
	}
	name := r.name
	if name == "" { // a client from before DeviceOp.Name
		name = r.path
	}
	snap, clone, err := rbd.CloneTarget(parent, name)
	if err != nil {
		return err
	}
	if err := d.checkSource("rbd", clone.String()); err != nil {
		return err
	}
	p := dev.worker.proc
	// Paused, the worker has flushed and closed the image and released its
	// lock: the snapshot holds every acknowledged write, and nobody writes.
	if _, err := p.Call(ctx, worker.Request{Op: worker.OpPause}); err != nil {
		return err
	}
	dev.ctl.paused = true
	undo, err := rbd.SnapshotClone(parent, snap, clone)
	if err == nil {
		_, err = p.Call(ctx, worker.Request{Op: worker.OpResume, Format: "rbd", Path: clone.String()})
		if err != nil {
			err = fmt.Errorf("resume on the clone: %w", err)
			if uerr := undo(); uerr != nil {
				err = fmt.Errorf("%w; and removing the clone and snapshot failed: %v", err, uerr)
			}
		}
	}
	if err != nil {
		if _, rerr := p.Call(context.WithoutCancel(ctx), worker.Request{Op: worker.OpResume}); rerr != nil {
			return fmt.Errorf("%w; and resuming on the old image failed: %v (the disk stays paused)", err, rerr)
		}
		dev.ctl.paused = false
		return err
	}
	if err := d.setParams(ctx, dev, "rbd", clone.String(), ""); err != nil {
		return err
	}
	dev.ctl.paused = false
	log.Info("device snapshotted", "snapshot", parent.Name()+"@"+snap, "clone", clone.Name())
	return nil
}
