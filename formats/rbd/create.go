//go:build rbd

package rbd

import (
	"errors"
	"fmt"
	"math/bits"
	"os"

	librbd "github.com/ceph/go-ceph/rbd"
)

// Create makes a new image, with the pool's default features (which
// include exclusive-lock, layering and fast-diff on every Ceph release we
// build against) unless opts name them. It never overwrites: an existing
// image gives an error wrapping fs.ErrExist.
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
	if err := opts.Check(); err != nil {
		return fmt.Errorf("create rbd:%s: %w", spec.Name(), err)
	}
	conn, ioctx, err := connect(spec)
	if err != nil {
		return fmt.Errorf("create rbd:%s: %w", spec.Name(), err)
	}
	defer conn.Shutdown()
	defer ioctx.Destroy()
	ro := librbd.NewRbdImageOptions()
	defer ro.Destroy()
	if err := setImageOptions(ro, opts); err != nil {
		return fmt.Errorf("create rbd:%s: %w", spec.Name(), err)
	}
	err = librbd.CreateImage(ioctx, spec.Image, uint64(opts.Size), ro)
	if errors.Is(err, librbd.ErrExist) {
		return fmt.Errorf("create rbd:%s: %w", spec.Name(), os.ErrExist)
	}
	if err != nil {
		return fmt.Errorf("create rbd:%s: %w", spec.Name(), err)
	}
	return nil
}

// setImageOptions hands opts to librbd; what is left unset takes the
// pool's and the cluster's defaults.
func setImageOptions(ro *librbd.ImageOptions, opts CreateOptions) error {
	var errs []error
	if opts.ObjectSize != 0 {
		errs = append(errs, ro.SetUint64(librbd.ImageOptionOrder, uint64(bits.TrailingZeros64(uint64(opts.ObjectSize)))))
	}
	if len(opts.Features) > 0 {
		errs = append(errs, ro.SetUint64(librbd.ImageOptionFeatures, uint64(librbd.FeatureSetFromNames(opts.Features))))
	}
	if opts.StripeUnit != 0 {
		errs = append(errs, ro.SetUint64(librbd.ImageOptionStripeUnit, uint64(opts.StripeUnit)),
			ro.SetUint64(librbd.ImageOptionStripeCount, uint64(opts.StripeCount)))
	}
	if opts.DataPool != "" {
		errs = append(errs, ro.SetString(librbd.ImageOptionDataPool, opts.DataPool))
	}
	return errors.Join(errs...)
}
