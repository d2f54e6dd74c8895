package vmdk

// The write path: grains written or allocated in sparse extents, flat
// extents written in place, and discards.

import (
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// WriteAt writes to the image. A write to part of an unallocated grain
// copies the rest of the grain from the parent.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if img.closed.Load() {
		return 0, image.ErrClosed
	}
	if img.readOnly {
		return 0, image.ErrReadOnly
	}
	if err := image.CheckRange(off, len(p), img.size); err != nil {
		return 0, err
	}
	if err := img.touchCID(); err != nil {
		return 0, err
	}
	err := img.each(off, int64(len(p)), func(e *extent, rel, a, b int64) error {
		q := p[a:b]
		if e.d.Access != "RW" {
			return fmt.Errorf("vmdk: extent %q is %s: %w", e.d.File, e.d.Access, image.ErrReadOnly)
		}
		switch {
		case e.sp != nil:
			return eachGrain(e.sp, rel, int64(len(q)), func(g uint64, in, x, y int64) error {
				return img.writeGrain(e, g, in, q[x:y])
			})
		case e.f != nil:
			if _, err := e.f.WriteAt(q, e.off+rel); err != nil {
				return fmt.Errorf("vmdk: write %s: %w", e.d.File, err)
			}
			return nil
		default:
			return fmt.Errorf("vmdk: write to a ZERO extent (descriptor line %d): %w", e.d.Line, image.ErrUnsupported)
		}
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

func (img *Image) writeGrain(e *extent, g uint64, in int64, q []byte) error {
	sp := e.sp
	st, off, reserved, err := sp.allocate(g)
	if err != nil {
		return err
	}
	if !reserved {
		if _, err := sp.f.WriteAt(q, off+in); err != nil {
			return fmt.Errorf("vmdk: write %s: %w", sp.name, err)
		}
		return nil
	}
	gb := sp.h.grainBytes()
	if err := sp.extend(off + gb); err != nil {
		sp.abort(g)
		return err
	}
	buf := q
	if int64(len(q)) != gb {
		buf = make([]byte, gb)
		if st == grainUnalloc {
			// Copy-on-write: the rest of the grain comes from the parent.
			vstart := e.start + int64(g)*gb
			end := min(vstart+gb, e.start+e.length)
			if err := img.readParent(buf[:end-vstart], vstart); err != nil {
				sp.abort(g)
				return err
			}
		}
		copy(buf[in:], q)
	}
	if _, err := sp.f.WriteAt(buf, off); err != nil {
		sp.abort(g)
		return fmt.Errorf("vmdk: write %s: %w", sp.name, err)
	}
	if st == grainUnalloc && img.backing != nil {
		// Until the entry exists the grain reads from the parent; a
		// durable entry over lost data would read as zeros instead.
		if err := sp.gsync.Sync(sp.f.Sync); err != nil {
			sp.abort(g)
			return fmt.Errorf("vmdk: %s: sync grain %d: %w", sp.name, g, err)
		}
	}
	return sp.publish(g, grainData, off, true)
}

// Discard makes a range read as zeros. Whole grains are unmapped (or
// marked zeroed-grain when the image has a parent and the flag); partial
// grains are zeroed in place; flat extents get holes punched.
func (img *Image) Discard(off, length int64) error {
	if img.closed.Load() {
		return image.ErrClosed
	}
	if img.readOnly {
		return image.ErrReadOnly
	}
	if err := image.CheckRange64(off, length, img.size); err != nil {
		return err
	}
	if err := img.touchCID(); err != nil {
		return err
	}
	return img.each(off, length, func(e *extent, rel, a, b int64) error {
		n := b - a
		if e.d.Access != "RW" {
			return fmt.Errorf("vmdk: extent %q is %s: %w", e.d.File, e.d.Access, image.ErrReadOnly)
		}
		switch {
		case e.sp != nil:
			return img.discardSparse(e, rel, n)
		case e.f != nil:
			if err := e.f.PunchHole(e.off+rel, n); err == nil {
				return nil
			}
			return writeZeros(e.f, e.off+rel, n)
		}
		return nil
	})
}

func (img *Image) discardSparse(e *extent, rel, n int64) error {
	sp := e.sp
	gb := sp.h.grainBytes()
	zeroFlag := sp.h.Flags&flagZeroGrain != 0
	zeros := make([]byte, min(gb, n))
	return eachGrain(sp, rel, n, func(g uint64, in, a, b int64) error {
		full := in == 0 && (b-a == gb || rel+b == e.length)
		if full && img.backing == nil {
			return sp.publish(g, grainUnalloc, 0, false)
		}
		if full && zeroFlag {
			return sp.publish(g, grainZero, 0, false)
		}
		sp.mu.Lock()
		st, _, err := sp.lookupLocked(g)
		sp.mu.Unlock()
		if err != nil {
			return err
		}
		if st == grainZero || st == grainUnalloc && img.backing == nil {
			return nil
		}
		return img.writeGrain(e, g, in, zeros[:b-a])
	})
}

func writeZeros(f hostfile.File, off, n int64) error {
	z := make([]byte, min(n, 1<<20))
	for n > 0 {
		k := min(n, int64(len(z)))
		if _, err := f.WriteAt(z[:k], off); err != nil {
			return fmt.Errorf("vmdk: zero: %w", err)
		}
		off += k
		n -= k
	}
	return nil
}
