//go:build rbd

package rbd

import (
	"errors"
	"fmt"
	"os"

	"github.com/ceph/go-ceph/rados"
	librbd "github.com/ceph/go-ceph/rbd"
)

// SnapshotClone snapshots parent (PARENT@snap), protects the snapshot and
// clones it to clone: a copy-on-write child that reads the snapshot's data
// until written. It is `blktap snapshot` for an rbd disk, done while the
// disk is paused (its writes flushed, its lock released), so the snapshot
// holds every write the disk acknowledged. On failure nothing is left
// behind; on success undo removes both again (the caller's way back when
// the disk cannot go on on the clone).
func SnapshotClone(parent Spec, snap string, clone Spec) (undo func() error, err error) {
	conn, ioctx, err := connect(parent)
	if err != nil {
		return nil, fmt.Errorf("snapshot rbd:%s: %w", parent.Name(), err)
	}
	defer conn.Shutdown()
	defer ioctx.Destroy()
	cctx, err := cloneContext(conn, ioctx, parent, clone)
	if err != nil {
		return nil, fmt.Errorf("snapshot rbd:%s: %w", parent.Name(), err)
	}
	if cctx != ioctx {
		defer cctx.Destroy()
	}
	if err := makeProtectedSnap(ioctx, parent, snap); err != nil {
		return nil, err
	}
	ro := librbd.NewRbdImageOptions()
	defer ro.Destroy()
	err = librbd.CloneImage(ioctx, parent.Image, snap, cctx, clone.Image, ro)
	if err != nil {
		if errors.Is(err, librbd.ErrExist) {
			err = fmt.Errorf("%w (name another clone)", os.ErrExist)
		}
		err = fmt.Errorf("clone rbd:%s@%s to rbd:%s: %w", parent.Name(), snap, clone.Name(), err)
		if uerr := removeSnap(ioctx, parent, snap); uerr != nil {
			err = fmt.Errorf("%w; and removing the snapshot again failed: %v", err, uerr)
		}
		return nil, err
	}
	return func() error { return RemoveSnapshotClone(parent, snap, clone) }, nil
}

// cloneContext is the I/O context of the clone's pool and namespace:
// ioctx itself when they are the parent's.
func cloneContext(conn *rados.Conn, ioctx *rados.IOContext, parent, clone Spec) (*rados.IOContext, error) {
	if clone.Pool == parent.Pool && clone.Namespace == parent.Namespace {
		return ioctx, nil
	}
	cctx, err := conn.OpenIOContext(clone.Pool)
	if err != nil {
		return nil, fmt.Errorf("open the clone's pool %q: %w", clone.Pool, err)
	}
	cctx.SetNamespace(clone.Namespace)
	return cctx, nil
}

// makeProtectedSnap creates PARENT@snap and protects it: a clone's
// parent must never be removed under it (clone v1 refuses to clone an
// unprotected snapshot, and protection keeps `rbd snap rm` away).
func makeProtectedSnap(ioctx *rados.IOContext, parent Spec, snap string) error {
	img, err := librbd.OpenImage(ioctx, parent.Image, librbd.NoSnapshot)
	if err != nil {
		return fmt.Errorf("snapshot rbd:%s: %w", parent.Name(), err)
	}
	defer img.Close()
	s, err := img.CreateSnapshot(snap)
	if errors.Is(err, librbd.ErrExist) {
		return fmt.Errorf("snapshot rbd:%s@%s: %w (name another snapshot)", parent.Name(), snap, os.ErrExist)
	}
	if err != nil {
		return fmt.Errorf("snapshot rbd:%s@%s: %w", parent.Name(), snap, err)
	}
	if err := s.Protect(); err != nil {
		err = fmt.Errorf("protect rbd:%s@%s: %w", parent.Name(), snap, err)
		if rerr := s.Remove(); rerr != nil {
			err = fmt.Errorf("%w; and removing it again failed: %v", err, rerr)
		}
		return err
	}
	return nil
}

// removeSnap unprotects and removes PARENT@snap.
func removeSnap(ioctx *rados.IOContext, parent Spec, snap string) error {
	img, err := librbd.OpenImage(ioctx, parent.Image, librbd.NoSnapshot)
	if err != nil {
		return err
	}
	defer img.Close()
	s := img.GetSnapshot(snap)
	if err := s.Unprotect(); err != nil {
		return fmt.Errorf("unprotect rbd:%s@%s: %w", parent.Name(), snap, err)
	}
	return s.Remove()
}

// RemoveSnapshotClone removes what SnapshotClone made: the clone, then
// the snapshot.
func RemoveSnapshotClone(parent Spec, snap string, clone Spec) error {
	conn, ioctx, err := connect(parent)
	if err != nil {
		return err
	}
	defer conn.Shutdown()
	defer ioctx.Destroy()
	cctx, err := cloneContext(conn, ioctx, parent, clone)
	if err != nil {
		return err
	}
	if cctx != ioctx {
		defer cctx.Destroy()
	}
	if err := librbd.RemoveImage(cctx, clone.Image); err != nil && !errors.Is(err, librbd.ErrNotFound) {
		return fmt.Errorf("remove rbd:%s: %w", clone.Name(), err)
	}
	return removeSnap(ioctx, parent, snap)
}
