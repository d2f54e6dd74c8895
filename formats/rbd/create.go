//go:build rbd

package rbd

import (
	"errors"
	"fmt"
	"os"

	librbd "github.com/ceph/go-ceph/rbd"
)

// CreateOptions control Create.
type CreateOptions struct {
	Size int64
}

// Create makes a new image with the pool's default features (which
// include exclusive-lock, layering and fast-diff on every Ceph release we
// build against). It never overwrites: an existing image gives an error
// wrapping fs.ErrExist.
func Create(name string, opts CreateOptions) error {
	spec, err := ParseSpec(name)
	if err != nil {
		return err
	}
	if spec.Snap != "" {
		return fmt.Errorf("create rbd:%s: a snapshot is made from an image, not created (drop @%s)", spec.Name(), spec.Snap)
	}
	if opts.Size <= 0 {
		return fmt.Errorf("create rbd:%s: size %d: an rbd image needs a size above 0", spec.Name(), opts.Size)
	}
	conn, ioctx, err := connect(spec)
	if err != nil {
		return fmt.Errorf("create rbd:%s: %w", spec.Name(), err)
	}
	defer conn.Shutdown()
	defer ioctx.Destroy()
	ro := librbd.NewRbdImageOptions()
	defer ro.Destroy()
	err = librbd.CreateImage(ioctx, spec.Image, uint64(opts.Size), ro)
	if errors.Is(err, librbd.ErrExist) {
		return fmt.Errorf("create rbd:%s: %w", spec.Name(), os.ErrExist)
	}
	if err != nil {
		return fmt.Errorf("create rbd:%s: %w", spec.Name(), err)
	}
	return nil
}
