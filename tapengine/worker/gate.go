package worker

import (
	"sync"

	"github.com/blktap-go/blktap/formats/image"
)

// gate stands between every consumer (the ring loop, the NBD export) and
// the image, so the worker can hold I/O and swap the image underneath:
//
//  1. Every call takes the read side: calls run concurrently.
//  2. pause takes the write side: it waits for the calls in flight, and
//     every later call waits until resume. Nothing is refused or lost.
//  3. resume installs an image (the old one reopened, or a new one such
//     as a snapshot overlay) and lets the waiting calls through.
//
// Safe for concurrent use.
type gate struct {
	mu  sync.RWMutex
	img image.Image
}

var _ image.Image = (*gate)(nil)

func (g *gate) ReadAt(p []byte, off int64) (int, error) {
	g.mu.RLock()
	defer g.mu.RUnlock()
	return g.img.ReadAt(p, off)
}

func (g *gate) WriteAt(p []byte, off int64) (int, error) {
	g.mu.RLock()
	defer g.mu.RUnlock()
	return g.img.WriteAt(p, off)
}

func (g *gate) Size() int64 {
	g.mu.RLock()
	defer g.mu.RUnlock()
	return g.img.Size()
}

func (g *gate) Flush() error {
	g.mu.RLock()
	defer g.mu.RUnlock()
	return g.img.Flush()
}

func (g *gate) Discard(off, length int64) error {
	g.mu.RLock()
	defer g.mu.RUnlock()
	return g.img.Discard(off, length)
}

func (g *gate) Map(off, length int64) ([]image.Extent, error) {
	g.mu.RLock()
	defer g.mu.RUnlock()
	return g.img.Map(off, length)
}

// start starts a read (or write) of p at off when the image starts calls
// (image.Starter), with the gate's read side held until the call
// completes to c: pause waits for it as for any call in flight, and c
// must call done then. It reports false, having done nothing, when the
// image cannot start calls.
func (g *gate) start(write bool, p []byte, off int64, c image.Completer, cookie uint64) (bool, error) {
	g.mu.RLock()
	s, ok := g.img.(image.Starter)
	if !ok || !s.Starts() {
		g.mu.RUnlock()
		return false, nil
	}
	var err error
	if write {
		err = s.StartWrite(p, off, c, cookie)
	} else {
		err = s.StartRead(p, off, c, cookie)
	}
	if err != nil {
		g.mu.RUnlock()
	}
	return true, err
}

// done releases the read side a started call held.
func (g *gate) done() { g.mu.RUnlock() }

// Close closes the image behind the gate; the worker calls it only when no
// consumer is left.
func (g *gate) Close() error {
	g.mu.RLock()
	defer g.mu.RUnlock()
	return g.img.Close()
}

// pause waits for the calls in flight and holds every later one; it
// returns the image, which the caller now owns.
func (g *gate) pause() image.Image {
	g.mu.Lock()
	return g.img
}

// resume installs img and releases the calls pause held.
func (g *gate) resume(img image.Image) {
	g.img = img
	g.mu.Unlock()
}

// closedImage answers every call with ErrClosed: what a paused worker
// that is told to stop resumes onto, so held calls end.
type closedImage struct{ size int64 }

func (c closedImage) ReadAt([]byte, int64) (int, error)        { return 0, image.ErrClosed }
func (c closedImage) WriteAt([]byte, int64) (int, error)       { return 0, image.ErrClosed }
func (c closedImage) Size() int64                              { return c.size }
func (c closedImage) Flush() error                             { return image.ErrClosed }
func (c closedImage) Discard(int64, int64) error               { return image.ErrClosed }
func (c closedImage) Map(int64, int64) ([]image.Extent, error) { return nil, image.ErrClosed }
func (c closedImage) Close() error                             { return nil }
