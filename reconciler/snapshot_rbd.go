package reconciler

import (
	"context"
	"fmt"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/formats/rbd"
	"github.com/blktap-go/blktap/internal/rbdspec"
	"github.com/blktap-go/blktap/tapengine/worker"
)

// snapshotRBD is `blktap snapshot` for an rbd disk; it reports false for
// any other disk, which gets an overlay file (snapshotDevice).
//
// The semantics are the overlay file's: the image as it was at the
// snapshot becomes the read-only base, and the disk goes on writing a
// copy-on-write child of it. Here the base is the protected snapshot
// IMAGE@NAME and the child an RBD clone of it (IMAGE-NAME beside the
// image unless named), so the data never leaves the cluster and no file
// on this host joins the disk's chain. IMAGE's head keeps the snapshot's
// contents as long as nothing else writes it.
func (d *Daemon) snapshotRBD(ctx context.Context, k Key, op DeviceOp) (bool, error) {
	params, err := d.xs.Read(ctx, d.backendPath(k)+"/params")
	if err != nil {
		return false, nil // snapshotDevice reads it again and says why
	}
	format, base, err := ParseParams(params)
	if err != nil || format != "rbd" {
		return false, nil
	}
	return true, d.snapshotClone(ctx, k, base, op)
}

func (d *Daemon) snapshotClone(ctx context.Context, k Key, base string, op DeviceOp) error {
	if op.Format != "" && op.Format != "rbd" {
		return fmt.Errorf("%w: an rbd disk's snapshot is an RBD snapshot and clone, not a %s overlay (leave out -f)", formats.ErrUnsupported, op.Format)
	}
	parent, err := rbdspec.Parse(base)
	if err != nil {
		return err
	}
	name := op.Name
	if name == "" { // a client from before DeviceOp.Name
		name = op.Path
	}
	snap, clone, err := rbd.CloneTarget(parent, name)
	if err != nil {
		return err
	}
	if err := d.checkSource("rbd", clone.String()); err != nil {
		return err
	}
	p, err := d.procFor(k)
	if err != nil {
		return err
	}
	// Paused, the worker has flushed and closed the image and released its
	// lock: the snapshot holds every acknowledged write, and nobody writes.
	if err := d.pauseDevice(ctx, k); err != nil {
		return err
	}
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
		if _, rerr := p.Call(context.Background(), worker.Request{Op: worker.OpResume}); rerr != nil {
			return fmt.Errorf("%w; and resuming on the old image failed: %v (the disk stays paused)", err, rerr)
		}
		d.setPaused(k, false)
		return err
	}
	if err := d.setParams(ctx, k, "rbd", clone.String(), ""); err != nil {
		return err
	}
	d.setPaused(k, false)
	d.log.Info("device snapshotted", "device", k.String(), "snapshot", parent.Name()+"@"+snap, "clone", clone.Name())
	return nil
}
