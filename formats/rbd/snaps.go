//go:build rbd

package rbd

import (
	"errors"
	"fmt"
	"os"
	"time"

	librbd "github.com/ceph/go-ceph/rbd"
)

// SnapInfo describes one snapshot of an image, as `rbd snap ls` does.
type SnapInfo struct {
	ID        uint64
	Name      string
	Size      int64 // the image's size when it was taken
	Protected bool
	Time      time.Time
}

// withImage opens name's head (read-only unless write) for fn.
func withImage(name string, write bool, fn func(Spec, *librbd.Image) error) error {
	spec, err := ParseSpec(name)
	if err != nil {
		return err
	}
	if spec.Snap != "" {
		return fmt.Errorf("%w: rbd:%s names a snapshot; give the image", ErrBadSpec, spec.Name())
	}
	conn, ioctx, err := connect(spec)
	if err != nil {
		return fmt.Errorf("rbd:%s: %w", spec.Name(), err)
	}
	defer conn.Shutdown()
	defer ioctx.Destroy()
	var img *librbd.Image
	if write {
		img, err = librbd.OpenImage(ioctx, spec.Image, librbd.NoSnapshot)
	} else {
		img, err = librbd.OpenImageReadOnly(ioctx, spec.Image, librbd.NoSnapshot)
	}
	if errors.Is(err, librbd.ErrNotFound) {
		return fmt.Errorf("rbd:%s: no such image: %w", spec.Name(), os.ErrNotExist)
	}
	if err != nil {
		return fmt.Errorf("rbd:%s: %w", spec.Name(), err)
	}
	defer img.Close()
	return fn(spec, img)
}

// Snapshots lists name's snapshots, oldest first.
func Snapshots(name string) ([]SnapInfo, error) {
	var out []SnapInfo
	err := withImage(name, false, func(spec Spec, img *librbd.Image) error {
		snaps, err := img.GetSnapshotNames()
		if err != nil {
			return fmt.Errorf("list snapshots of rbd:%s: %w", spec.Name(), err)
		}
		for _, s := range snaps {
			info := SnapInfo{ID: s.Id, Name: s.Name, Size: int64(s.Size)}
			if p, err := img.GetSnapshot(s.Name).IsProtected(); err == nil {
				info.Protected = p
			}
			if ts, err := img.GetSnapTimestamp(s.Id); err == nil {
				info.Time = time.Unix(int64(ts.Sec), int64(ts.Nsec))
			}
			out = append(out, info)
		}
		return nil
	})
	return out, err
}

// CreateSnapshot takes snapshot snap of name. On an image open for
// writing elsewhere (a served disk) librbd forwards the request to the
// lock holder, which takes it between requests: crash-consistent, what a
// power cut would have left. `blktap snapshot` pauses the disk instead.
func CreateSnapshot(name, snap string) error {
	return withImage(name, true, func(spec Spec, img *librbd.Image) error {
		check := spec
		check.Snap = snap
		if _, err := ParseSpec(check.String()); err != nil {
			return err
		}
		_, err := img.CreateSnapshot(snap)
		if errors.Is(err, librbd.ErrExist) {
			return fmt.Errorf("snapshot rbd:%s@%s: %w", spec.Name(), snap, os.ErrExist)
		}
		if err != nil {
			return fmt.Errorf("snapshot rbd:%s@%s: %w", spec.Name(), snap, err)
		}
		return nil
	})
}

// DeleteSnapshot removes snapshot snap of name, unprotecting it first
// when no clone depends on it; one that has clones is refused.
func DeleteSnapshot(name, snap string) error {
	return withImage(name, true, func(spec Spec, img *librbd.Image) error {
		s := img.GetSnapshot(snap)
		p, err := s.IsProtected()
		if errors.Is(err, librbd.ErrNotFound) {
			return fmt.Errorf("rbd:%s@%s: no such snapshot: %w", spec.Name(), snap, os.ErrNotExist)
		}
		if err != nil {
			return fmt.Errorf("rbd:%s@%s: %w", spec.Name(), snap, err)
		}
		if p {
			if err := s.Unprotect(); err != nil {
				return fmt.Errorf("rbd:%s@%s is protected and cannot be unprotected (clones of it exist? flatten or remove them first): %w", spec.Name(), snap, err)
			}
		}
		if err := s.Remove(); err != nil {
			return fmt.Errorf("remove rbd:%s@%s: %w", spec.Name(), snap, err)
		}
		return nil
	})
}

// RollbackSnapshot rewrites name's head to what snapshot snap holds (rbd
// snap rollback). It holds the image's exclusive lock meanwhile, taken
// explicitly, so an image a worker has open for writing is refused naming
// its holder: rolling back under a served disk would change what the
// guest reads with no write of its own, and librbd would otherwise ask
// the holder to let go. A worker that opens the image meanwhile is
// refused in turn and retries once the rollback is done.
func RollbackSnapshot(name, snap string) error {
	return withImage(name, true, func(spec Spec, img *librbd.Image) error {
		s := img.GetSnapshot(snap)
		if _, err := s.IsProtected(); errors.Is(err, librbd.ErrNotFound) {
			return fmt.Errorf("rbd:%s@%s: no such snapshot: %w", spec.Name(), snap, os.ErrNotExist)
		} else if err != nil {
			return fmt.Errorf("rbd:%s@%s: %w", spec.Name(), snap, err)
		}
		im := &Image{img: img, spec: spec}
		if err := img.LockAcquire(librbd.LockModeExclusive); err != nil {
			return fmt.Errorf("roll rbd:%s back to @%s: %w", spec.Name(), snap, &LockedError{Image: spec.Name(), Holder: im.describeHolder()})
		}
		defer img.LockRelease()
		if err := s.Rollback(); err != nil {
			return fmt.Errorf("roll rbd:%s back to @%s: %w", spec.Name(), snap, err)
		}
		return nil
	})
}
