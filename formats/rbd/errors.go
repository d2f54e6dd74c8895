package rbd

import (
	"errors"
	"fmt"
)

// ErrNotBuilt: this binary was built without librbd.
var ErrNotBuilt = errors.New("this blktap was built without the rbd format (build it with `make build-rbd`, which needs librbd-dev)")

// ErrLocked is what a LockedError unwraps to.
var ErrLocked = errors.New("image is locked")

// LockedError: another live client holds the image's exclusive lock.
type LockedError struct {
	Image  string // the spec's Name
	Holder string // librbd's owner, and what the holder wrote of itself
}

func (e *LockedError) Error() string {
	return fmt.Sprintf("locked by %s: rbd:%s is open for writing elsewhere (pause or detach it there first)", e.Holder, e.Image)
}

func (e *LockedError) Unwrap() error { return ErrLocked }
