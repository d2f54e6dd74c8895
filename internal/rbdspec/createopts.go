package rbdspec

import (
	"fmt"
	"math/bits"
	"slices"
	"strings"
)

// CreateOptions control the rbd format's Create. Zero values leave the choice to the
// pool's defaults (rbd_default_features, rbd_default_order, ...), as
// `rbd create` does.
type CreateOptions struct {
	Size int64
	// ObjectSize is the size of the RADOS objects the image is cut into:
	// a power of two from 4 KiB to 32 MiB (rbd's --object-size).
	ObjectSize int64
	// Features are rbd's --image-feature names; none means the pool's
	// defaults. exclusive-lock is required: blktap writes only images that
	// keep a second host out (package doc, 1).
	Features []string
	// StripeUnit and StripeCount are rbd's fancy striping: StripeUnit
	// bytes go to each of StripeCount objects in turn.
	StripeUnit, StripeCount int64
	// DataPool holds the image's data objects; its metadata stays in the
	// image's own pool (an erasure-coded data pool, typically).
	DataPool string
}

// Features blktap creates, each with what it needs; the order is
// `rbd create`'s.
var featureNeeds = map[string]string{
	"layering":       "",
	"exclusive-lock": "",
	"object-map":     "exclusive-lock",
	"fast-diff":      "object-map",
	"deep-flatten":   "",
	"journaling":     "exclusive-lock",
}

// FeatureNames are the names CreateOptions.Features takes.
func FeatureNames() []string {
	return []string{"layering", "exclusive-lock", "object-map", "fast-diff", "deep-flatten", "journaling"}
}

// ParseFeatures reads features=a+b+c (the -o list already splits at
// commas, so the names are joined with '+').
func ParseFeatures(v string) ([]string, error) {
	var out []string
	for _, f := range strings.Split(v, "+") {
		f = strings.TrimSpace(f)
		if _, ok := featureNeeds[f]; !ok {
			return nil, fmt.Errorf("unknown rbd feature %q (valid: %s, joined with '+')", f, strings.Join(FeatureNames(), ", "))
		}
		if !slices.Contains(out, f) {
			out = append(out, f)
		}
	}
	return out, nil
}

// Check refuses what librbd would refuse with a bare EINVAL, saying why.
func (o CreateOptions) Check() error {
	if o.ObjectSize != 0 && (o.ObjectSize < 4<<10 || o.ObjectSize > 32<<20 || bits.OnesCount64(uint64(o.ObjectSize)) != 1) {
		return fmt.Errorf("object size %d: want a power of two from 4K to 32M", o.ObjectSize)
	}
	if len(o.Features) > 0 {
		for _, f := range o.Features {
			if need, ok := featureNeeds[f]; !ok {
				return fmt.Errorf("unknown rbd feature %q (valid: %s)", f, strings.Join(FeatureNames(), ", "))
			} else if need != "" && !slices.Contains(o.Features, need) {
				return fmt.Errorf("rbd feature %s needs %s", f, need)
			}
		}
		if !slices.Contains(o.Features, "exclusive-lock") {
			return fmt.Errorf("features without exclusive-lock: blktap writes only images whose lock keeps a second writer out (add exclusive-lock)")
		}
	}
	if (o.StripeUnit == 0) != (o.StripeCount == 0) {
		return fmt.Errorf("stripe_unit and stripe_count go together (stripe_unit=%d, stripe_count=%d)", o.StripeUnit, o.StripeCount)
	}
	if o.StripeUnit < 0 || o.StripeCount < 0 {
		return fmt.Errorf("negative stripe_unit or stripe_count")
	}
	if o.StripeUnit != 0 {
		obj := o.ObjectSize
		if obj == 0 {
			obj = 4 << 20 // librbd's default order 22
		}
		if o.StripeUnit > obj || obj%o.StripeUnit != 0 || o.StripeUnit%(4<<10) != 0 {
			return fmt.Errorf("stripe_unit %d must be a multiple of 4K that divides the object size (%d)", o.StripeUnit, obj)
		}
	}
	return nil
}
