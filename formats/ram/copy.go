package ram

import (
	"errors"
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
)

// copyChunk is the unit of Load and Save: big enough to amortise calls,
// small enough not to matter in memory.
const copyChunk = 1 << 20

// Load fills the disk from src (an image file opened by the caller, e.g.
// on attach): src's data is copied, its holes and zero runs are
// discarded here, so the result reads exactly as src and costs memory only
// for src's data. src must not be larger than the disk.
func (img *Image) Load(src image.Image) error {
	if src.Size() > img.size {
		return fmt.Errorf("ram: %s: load: source is %d bytes, the disk only %d", img.name, src.Size(), img.size)
	}
	if err := copyImage(img, src, src.Size()); err != nil {
		return fmt.Errorf("ram: %s: load: %w", img.name, err)
	}
	return nil
}

// Save writes the whole disk into dst (e.g. on a clean detach) and
// flushes it: data is copied, holes become discards in dst (or written
// zeros where dst cannot discard). dst must be at least as large as the
// disk.
func (img *Image) Save(dst image.Image) error {
	if dst.Size() < img.size {
		return fmt.Errorf("ram: %s: save: destination is %d bytes, the disk %d", img.name, dst.Size(), img.size)
	}
	if err := copyImage(dst, img, img.size); err != nil {
		return fmt.Errorf("ram: %s: save: %w", img.name, err)
	}
	if err := dst.Flush(); err != nil {
		return fmt.Errorf("ram: %s: save: %w", img.name, err)
	}
	return nil
}

// copyImage makes dst[0, size) read as src[0, size), guided by src's Map.
func copyImage(dst, src image.Image, size int64) error {
	buf := make([]byte, min(copyChunk, max(size, 1)))
	var zeros []byte
	for off := int64(0); off < size; {
		ext, err := src.Map(off, min(size-off, 1<<30))
		if err != nil {
			return err
		}
		if len(ext) == 0 {
			return fmt.Errorf("source map of %d+ is empty", off)
		}
		for _, e := range ext {
			if e.Kind == image.Data {
				for p := e.Offset; p < e.Offset+e.Length; {
					n := min(int64(len(buf)), e.Offset+e.Length-p)
					if _, err := src.ReadAt(buf[:n], p); err != nil {
						return err
					}
					if _, err := dst.WriteAt(buf[:n], p); err != nil {
						return err
					}
					p += n
				}
				continue
			}
			err := dst.Discard(e.Offset, e.Length)
			if errors.Is(err, image.ErrUnsupported) {
				if zeros == nil {
					zeros = make([]byte, len(buf))
				}
				for p := e.Offset; p < e.Offset+e.Length; {
					n := min(int64(len(zeros)), e.Offset+e.Length-p)
					if _, err := dst.WriteAt(zeros[:n], p); err != nil {
						return err
					}
					p += n
				}
				err = nil
			}
			if err != nil {
				return err
			}
		}
		last := ext[len(ext)-1]
		next := last.Offset + last.Length
		if next <= off {
			return fmt.Errorf("source map made no progress at %d", off)
		}
		off = next
	}
	return nil
}
