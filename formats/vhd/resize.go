package vhd

// Changing the virtual size (`image resize`; qemu's vpc driver has none).
// A fixed disk's footer moves: the new one is written and synced first,
// so the file always ends in a valid footer. A dynamic disk changes its
// footer's size fields, after a larger BAT when its BAT cannot name the
// new size's blocks (grow.go); a shrink drops no data block (one past the
// new end is refused).

import (
	"bytes"
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// Resize sets the virtual size to size bytes, a positive multiple of 512.
// It must not run concurrently with other calls on img.
func (img *Image) Resize(size int64) error {
	if img.ro {
		return image.ErrReadOnly
	}
	if size <= 0 || size%sectorSize != 0 || size > 1<<44 {
		return fmt.Errorf("vhd: the new size must be a positive multiple of 512 up to 16 TiB (not %d)", size)
	}
	unlock, err := img.exclusive()
	if err != nil {
		return err
	}
	defer unlock()
	if img.sizeFrom != "current_size" {
		if c, h, s := chs(uint64(size)); int64(c)*int64(h)*int64(s)*sectorSize != size {
			return fmt.Errorf("vhd: %s: %w: its creator sizes disks by CHS geometry, which cannot express %d bytes", img.path, image.ErrUnsupported, size)
		}
	}
	switch img.foot.Type {
	case typeFixed:
		return img.resizeFixed(size)
	case typeDynamic:
		return img.resizeDynamic(size)
	}
	return fmt.Errorf("vhd: %s: %w: a differencing disk keeps its parent's size", img.path, image.ErrUnsupported)
}

// newFooter sets the footer's size fields for size.
func (img *Image) newFooter(size int64) {
	// Both sizes, as a new disk has them: libvhdi reports the original.
	img.foot.OrigSize, img.foot.CurrentSize = uint64(size), uint64(size)
	img.foot.Cylinders, img.foot.Heads, img.foot.SPT = chs(uint64(size))
	img.foot.encode()
}

// resizeFixed writes the footer at its new place and syncs it, then clears
// the old one (grow: it lies in the new space) or cuts the file (shrink).
// A cut between leaves the old size whole (shrink) or the new size with
// the old footer's 512 bytes showing in the new space (grow).
func (img *Image) resizeFixed(size int64) error {
	old := img.size
	img.newFooter(size)
	if err := img.writeFooterLocked(size); err != nil {
		return err
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	if size > old {
		if err := img.f.PunchHole(old, footerSize); err != nil {
			return fmt.Errorf("vhd: clear the old footer: %w", err)
		}
	} else if err := img.f.Truncate(size + footerSize); err != nil {
		return fmt.Errorf("vhd: %w", err)
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	img.size = size
	return nil
}

// resizeDynamic rewrites both footer copies (the one at the end, which
// readers take, first).
func (img *Image) resizeDynamic(size int64) error {
	blocks := (size + img.blockSize - 1) / img.blockSize
	if blocks > int64(len(img.bat)) {
		if err := img.growTables(blocks); err != nil {
			return err
		}
	}
	img.mu.RLock()
	for i := size / img.blockSize; size < img.size && i*img.blockSize < img.size; i++ {
		if img.bat[i] != batUnused {
			img.mu.RUnlock()
			return fmt.Errorf("vhd: %s: %w: block %d, past the new end, holds data", img.path, image.ErrUnsupported, i)
		}
	}
	img.mu.RUnlock()
	img.newFooter(size)
	if err := img.writeFooterLocked(img.nextFree); err != nil {
		return err
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	if err := hostfile.WriteFull(img.f, img.foot.raw[:], 0); err != nil {
		return fmt.Errorf("vhd: write footer copy: %w", err)
	}
	img.size = size
	return img.f.Sync()
}

// healFooterCopy rewrites a dynamic or differencing disk's footer copy at
// offset 0 from the footer at the end (the one readers take) when the two
// differ: a resize cut between its two footer writes leaves them so.
func (img *Image) healFooterCopy() error {
	b := make([]byte, footerSize)
	if err := hostfile.ReadFull(img.f, b, 0); err != nil {
		return fmt.Errorf("vhd: read footer copy: %w", err)
	}
	if bytes.Equal(b, img.foot.raw[:]) {
		return nil
	}
	img.warn("footer copy at offset 0 differs from the footer at the end; rewritten from it")
	if err := hostfile.WriteFull(img.f, img.foot.raw[:], 0); err != nil {
		return fmt.Errorf("vhd: write footer copy: %w", err)
	}
	return img.f.Sync()
}

// exclusive waits out every call in flight and keeps others and block
// allocation out until unlock, for the calls that rewrite metadata
// wholesale (resize, rebase, emptying).
func (img *Image) exclusive() (unlock func(), err error) {
	if img.ro {
		return nil, image.ErrReadOnly
	}
	img.life.Lock()
	if img.closed {
		img.life.Unlock()
		return nil, image.ErrClosed
	}
	img.allocMu.Lock()
	return func() { img.allocMu.Unlock(); img.life.Unlock() }, nil
}
