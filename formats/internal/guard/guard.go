// Package guard holds the checks a flat image (raw, ram) makes before
// every call: closed, read-only, in range. Each fails with an error that
// starts with the image's label and wraps the image package's class, so
// that both formats say the same thing the same way.
package guard

import (
	"fmt"
	"sync/atomic"

	"github.com/blktap-go/blktap/formats/image"
)

// Guard is safe for concurrent use; its zero value is open, with no label.
type Guard struct {
	label  string // "raw: /srv/a.img", the start of every error
	closed atomic.Bool
}

// SetLabel sets the error prefix; call it before the image is shared.
func (g *Guard) SetLabel(label string) { g.label = label }

// Close marks the image closed and reports whether it already was.
func (g *Guard) Close() (already bool) { return g.closed.Swap(true) }

// Closed reports whether Close was called.
func (g *Guard) Closed() bool { return g.closed.Load() }

// Open fails with image.ErrClosed after Close.
func (g *Guard) Open() error {
	if g.closed.Load() {
		return fmt.Errorf("%s: %w", g.label, image.ErrClosed)
	}
	return nil
}

// Span checks a call on [off, off+length) of an image of size bytes: open,
// then in range (image.ErrOutOfRange).
func (g *Guard) Span(off, length, size int64) error {
	if err := g.Open(); err != nil {
		return err
	}
	if err := image.CheckRange64(off, length, size); err != nil {
		return fmt.Errorf("%s: %w", g.label, err)
	}
	return nil
}

// Change is Span for a call that changes the image (op names it: write,
// discard): it also fails with image.ErrReadOnly on a read-only image,
// after the closed check and before the range check.
func (g *Guard) Change(op string, readOnly bool, off, length, size int64) error {
	if err := g.Open(); err != nil {
		return err
	}
	if readOnly {
		return fmt.Errorf("%s: %s: %w", g.label, op, image.ErrReadOnly)
	}
	return g.Span(off, length, size)
}
