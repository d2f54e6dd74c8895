//go:build rbd

package rbd

import (
	"errors"
	"fmt"
	"os"

	librbd "github.com/ceph/go-ceph/rbd"

	"github.com/blktap-go/blktap/formats/image"
)

// lock takes the image's exclusive lock for as long as it is open
// (package doc, 1).
func (im *Image) lock() error {
	features, err := im.img.GetFeatures()
	if err != nil {
		return fmt.Errorf("features: %w", err)
	}
	if features&librbd.FeatureExclusiveLock == 0 {
		return fmt.Errorf("%w: the image lacks the exclusive-lock feature, so nothing would stop a second host from writing it (rbd feature enable %s exclusive-lock)",
			image.ErrUnsupported, im.spec.Name())
	}
	if err := im.img.LockAcquire(librbd.LockModeExclusive); err != nil {
		if errors.Is(err, librbd.ErrNotFound) {
			return err
		}
		return &LockedError{Image: im.spec.Name(), Holder: im.describeHolder()}
	}
	host, _ := os.Hostname()
	// Best effort: the lock holds without it; it only names us to others.
	_ = im.img.SetMetadata(holderKey, fmt.Sprintf("blktap on host %s, pid %d", host, os.Getpid()))
	return nil
}
