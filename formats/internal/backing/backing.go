// Package backing holds the format-neutral halves of `image rebase` and
// `image commit`: which ranges to copy, and in what order against a
// crash. The formats supply the header rewrite (SetBacking) and the
// emptying (MakeEmpty). It sits under formats/internal so that the
// formats' own power-cut tests drive it as the tools do.
package backing

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
)

// backingSetter is an image whose header can name another backing file.
type backingSetter interface {
	SetBacking(name, format string) error
}

// backingChecker is a backingSetter that can say beforehand whether a
// name can be stored, so nothing is copied for a rebase that would fail.
type backingChecker interface {
	CheckBacking(name, format string) error
}

// emptier is an image that can drop every cluster it allocates, to read
// through to its backing file again.
type emptier interface {
	MakeEmpty() error
}

// rebaseGrain is the unit rebase compares and copies: small enough that a
// one-byte difference does not allocate much, a multiple of every cluster
// size up to 64 KiB so whole clusters are written.
const rebaseGrain = 64 << 10

// Options tune Rebase.
type Options struct {
	// Unsafe rewrites the header only, as qemu-img rebase -u: the image's
	// content changes wherever the old and new backing files differ.
	Unsafe   bool
	Progress func(done, total int64)
}

// Rebase makes name (of format) img's backing file, as qemu-img rebase.
// img is open for writing over its current backing chain; newBacking is
// the image name opens, read-only, or nil when name is "" (no backing
// file: the image becomes standalone).
//
// In safe mode the content a guest reads is unchanged: every grain img
// does not allocate itself where the old chain and newBacking differ is
// first written into img, then img is flushed, and only then is the
// header rewritten. A crash before the header write leaves img reading
// the same content over its old backing file, and one after it the same
// content over the new one.
func Rebase(ctx context.Context, img, newBacking image.Image, name, format string, opt Options) error {
	bs, ok := img.(backingSetter)
	if !ok {
		return fmt.Errorf("rebase: %w: this format cannot change its backing file here (qcow2, qcow and VHD differencing disks can)", image.ErrUnsupported)
	}
	if (name == "") != (newBacking == nil) && !opt.Unsafe {
		return fmt.Errorf("rebase: a backing file name wants its image open, and only it")
	}
	if c, ok := img.(backingChecker); ok {
		if err := c.CheckBacking(name, format); err != nil {
			return err
		}
	}
	if !opt.Unsafe {
		if err := copyDiffering(ctx, img, newBacking, opt.Progress); err != nil {
			return err
		}
		if err := img.Flush(); err != nil {
			return fmt.Errorf("rebase: flush: %w", err)
		}
	}
	return bs.SetBacking(name, format)
}

// copyDiffering writes into img what its old chain shows wherever img
// allocates nothing itself and nb (nil: all zeros) reads differently.
func copyDiffering(ctx context.Context, img, nb image.Image, progress func(done, total int64)) error {
	exts, err := MapAll(img)
	if err != nil {
		return fmt.Errorf("rebase: map: %w", err)
	}
	total := img.Size()
	old := make([]byte, rebaseGrain)
	neu := make([]byte, rebaseGrain)
	for _, e := range exts {
		if e.Kind != image.Hole && e.Depth == 0 {
			continue // img's own data or zeros: the backing file is not read there
		}
		for off := e.Offset; off < e.Offset+e.Length; {
			if err := ctx.Err(); err != nil {
				return err
			}
			// Grains on a fixed grid, so every write is whole clusters
			// unless the extent itself ends mid-grain.
			n := min(rebaseGrain-off%rebaseGrain, e.Offset+e.Length-off)
			if _, err := img.ReadAt(old[:n], off); err != nil {
				return fmt.Errorf("rebase: read at %d: %w", off, err)
			}
			if err := readPadded(nb, neu[:n], off); err != nil {
				return fmt.Errorf("rebase: read the new backing file at %d: %w", off, err)
			}
			if !bytes.Equal(old[:n], neu[:n]) {
				if _, err := img.WriteAt(old[:n], off); err != nil {
					return fmt.Errorf("rebase: write at %d: %w", off, err)
				}
			}
			off += n
			if progress != nil {
				progress(off, total)
			}
		}
	}
	if progress != nil {
		progress(total, total)
	}
	return nil
}

// readPadded reads p at off from img, as zeros past its end (a backing
// file shorter than its overlay) or when img is nil.
func readPadded(img image.Image, p []byte, off int64) error {
	clear(p)
	if img == nil || off >= img.Size() {
		return nil
	}
	n := min(int64(len(p)), img.Size()-off)
	_, err := img.ReadAt(p[:n], off)
	return err
}

// Commit writes every range top's chain allocates above base into base,
// as qemu-img commit: base is one of top's backing images, open for
// writing (top reads through it), and depth is its place in the chain (1:
// top's own backing file). base is flushed before Commit returns. With
// empty, top is then emptied, so it reads base's (now equal) content
// through; qemu-img empties only when no -b names the base.
//
// Order for a crash: base gets the data and is flushed before top drops
// any of it, so top's content is the same at every point.
func Commit(ctx context.Context, top, base image.Image, depth int, empty bool, progress func(done, total int64)) error {
	if base.Size() < top.Size() {
		return fmt.Errorf("commit: %w: the base is %d bytes, smaller than the image's %d (resize it first)", image.ErrUnsupported, base.Size(), top.Size())
	}
	var em emptier
	if empty {
		var ok bool
		if em, ok = top.(emptier); !ok {
			return fmt.Errorf("commit: %w: this format cannot be emptied here (qcow2, qcow and VHD differencing disks can; -d keeps the image as it is)", image.ErrUnsupported)
		}
		if c, ok := top.(interface{ CanEmpty() error }); ok {
			if err := c.CanEmpty(); err != nil {
				return fmt.Errorf("commit: %w", err)
			}
		}
	}
	exts, err := MapAll(top)
	if err != nil {
		return fmt.Errorf("commit: map: %w", err)
	}
	total := top.Size()
	buf := make([]byte, 1<<20)
	for _, e := range exts {
		if e.Kind == image.Hole || e.Depth >= depth {
			continue
		}
		if err := commitExtent(ctx, top, base, e, buf); err != nil {
			return err
		}
		if progress != nil {
			progress(e.Offset+e.Length, total)
		}
	}
	if err := base.Flush(); err != nil {
		return fmt.Errorf("commit: flush the base: %w", err)
	}
	if progress != nil {
		progress(total, total)
	}
	if em == nil {
		return nil
	}
	if err := em.MakeEmpty(); err != nil {
		return fmt.Errorf("commit: empty the image: %w", err)
	}
	return top.Flush()
}

// commitExtent copies one extent of top into base: zeros as a discard
// (which reads as zeros in every format), data as read through top.
func commitExtent(ctx context.Context, top, base image.Image, e image.Extent, buf []byte) error {
	if e.Kind == image.Zero {
		if err := base.Discard(e.Offset, e.Length); err != nil {
			return fmt.Errorf("commit: zero at %d: %w", e.Offset, err)
		}
		return nil
	}
	for off := e.Offset; off < e.Offset+e.Length; {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(int64(len(buf))-off%int64(len(buf)), e.Offset+e.Length-off)
		if _, err := top.ReadAt(buf[:n], off); err != nil {
			return fmt.Errorf("commit: read at %d: %w", off, err)
		}
		if _, err := base.WriteAt(buf[:n], off); err != nil {
			return fmt.Errorf("commit: write at %d: %w", off, err)
		}
		off += n
	}
	return nil
}

// MapAll returns the extents of the whole image, in chunks so a large
// image's map is never asked for at once. An image that cannot map itself
// is all data.
func MapAll(img image.Image) ([]image.Extent, error) {
	var all []image.Extent
	const chunk = 1 << 30
	for off := int64(0); off < img.Size(); off += chunk {
		exts, err := img.Map(off, min(chunk, img.Size()-off))
		if err != nil {
			if errors.Is(err, image.ErrUnsupported) {
				return []image.Extent{{Offset: 0, Length: img.Size(), Kind: image.Data}}, nil
			}
			return nil, err
		}
		all = append(all, exts...)
	}
	return all, nil
}
