//go:build !rbd

package rbd

import (
	"fmt"
	"log/slog"
	"time"

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

// SnapInfo describes one snapshot of an image.
type SnapInfo struct {
	ID        uint64
	Name      string
	Size      int64
	Protected bool
	Time      time.Time
}

// Snapshots fails: this binary was built without librbd.
func Snapshots(name string) ([]SnapInfo, error) {
	return nil, fmt.Errorf("rbd:%s: %w", name, ErrNotBuilt)
}

// CreateSnapshot fails: this binary was built without librbd.
func CreateSnapshot(name, _ string) error { return fmt.Errorf("rbd:%s: %w", name, ErrNotBuilt) }

// DeleteSnapshot fails: this binary was built without librbd.
func DeleteSnapshot(name, _ string) error { return fmt.Errorf("rbd:%s: %w", name, ErrNotBuilt) }

// RollbackSnapshot fails: this binary was built without librbd.
func RollbackSnapshot(name, _ string) error { return fmt.Errorf("rbd:%s: %w", name, ErrNotBuilt) }
