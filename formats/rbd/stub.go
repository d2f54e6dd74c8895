//go:build !rbd

package rbd

import (
	"fmt"
	"log/slog"

	"github.com/blktap-go/blktap/formats/image"
)

// Built reports whether this binary has the rbd format.
const Built = false

// Options control Open.
type Options struct {
	ReadOnly bool
	Logger   *slog.Logger
}

// Open fails: this binary was built without librbd.
func Open(name string, _ Options) (image.Image, error) {
	if _, err := ParseSpec(name); err != nil {
		return nil, err
	}
	return nil, fmt.Errorf("open rbd:%s: %w", name, ErrNotBuilt)
}

// Create fails: this binary was built without librbd.
func Create(name string, _ CreateOptions) error {
	if _, err := ParseSpec(name); err != nil {
		return err
	}
	return fmt.Errorf("create rbd:%s: %w", name, ErrNotBuilt)
}

// SnapshotClone fails: this binary was built without librbd.
func SnapshotClone(parent Spec, _ string, _ Spec) (func() error, error) {
	return nil, fmt.Errorf("snapshot rbd:%s: %w", parent.Name(), ErrNotBuilt)
}
