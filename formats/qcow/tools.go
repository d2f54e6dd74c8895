package qcow

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// Usage texts of the seed's two copy tools.
const (
	Img2QcowUsage = "Qcow-utils: v1.0.0\nusage: img2qcow <QCOW FILENAME> <SRC IMAGE>"
	Qcow2RawUsage = "Qcow-utils: v1.0.0\nusage: qcow2raw <Dest File descriptor> <Qcow SRC IMAGE>"
)

// copyChunk is how much the tools read at once; mapChunk how much they ask
// Map about at once (so a huge, empty source costs few extents in memory).
const (
	copyChunk = 1 << 20
	mapChunk  = 1 << 30
)

// Img2Qcow is the seed's `img2qcow QCOW_FILE IMAGE`: it creates qcowFile
// (never overwriting) with src's size and qemu's default layout, and copies
// src into it sparsely: ranges src maps as zero or hole, and clusters that
// read as all zeros, stay unallocated. On failure the new file is removed.
func Img2Qcow(ctx context.Context, qcowFile string, src image.Image) (err error) {
	if err := Create(qcowFile, CreateOptions{Size: src.Size()}); err != nil {
		return fmt.Errorf("img2qcow: %w", err)
	}
	defer func() {
		if err != nil {
			os.Remove(qcowFile)
		}
	}()
	dst, err := Open(qcowFile, Options{})
	if err != nil {
		return fmt.Errorf("img2qcow: %w", err)
	}
	cs := dst.h.clusterSize
	if err := copySparse(ctx, src, cs, func(p []byte, off int64) error {
		_, err := dst.WriteAt(p, off)
		return err
	}, nil); err != nil {
		dst.Close()
		return fmt.Errorf("img2qcow: %w", err)
	}
	if err := dst.Close(); err != nil {
		return fmt.Errorf("img2qcow: %w", err)
	}
	return nil
}

// copySparse copies src's data through write, skipping zero and hole
// extents and all-zero blocks of grain bytes. zero, when not nil, is called
// for every range skipped (for destinations that are not pre-zeroed).
func copySparse(ctx context.Context, src image.Image, grain int64, write func([]byte, int64) error,
	zero func(off, n int64) error) error {
	size := src.Size()
	buf := make([]byte, copyChunk)
	skip := func(off, n int64) error {
		if zero == nil || n <= 0 {
			return nil
		}
		return zero(off, n)
	}
	for mOff := int64(0); mOff < size; mOff += mapChunk {
		ext, err := src.Map(mOff, min(mapChunk, size-mOff))
		if err != nil {
			return fmt.Errorf("mapping source: %w", err)
		}
		for _, e := range ext {
			if e.Kind != image.Data {
				if err := skip(e.Offset, e.Length); err != nil {
					return err
				}
				continue
			}
			for off := e.Offset; off < e.Offset+e.Length; {
				if err := ctx.Err(); err != nil {
					return err
				}
				// Chunks end on grain boundaries so the zero test is per cluster.
				n := min(int64(len(buf)), e.Offset+e.Length-off)
				if end := off + n; end < e.Offset+e.Length && end%grain != 0 {
					n -= end % grain
					if n <= 0 {
						n = min(grain-off%grain, e.Offset+e.Length-off)
					}
				}
				p := buf[:n]
				if _, err := src.ReadAt(p, off); err != nil {
					return fmt.Errorf("reading source at %d: %w", off, err)
				}
				// Write runs of blocks that are not all zeros.
				for i := int64(0); i < n; {
					blk := min(grain-(off+i)%grain, n-i)
					if image.IsZero(p[i : i+blk]) {
						if err := skip(off+i, blk); err != nil {
							return err
						}
						i += blk
						continue
					}
					j := i + blk
					for j < n {
						b := min(grain-(off+j)%grain, n-j)
						if image.IsZero(p[j : j+b]) {
							break
						}
						j += b
					}
					if err := write(p[i:j], off+i); err != nil {
						return err
					}
					i = j
				}
				off += n
			}
		}
	}
	return nil
}

// Qcow2RawOptions tunes Qcow2RawWith.
type Qcow2RawOptions struct {
	// Open opens the qcow image (ReadOnly is forced); set Open.Backing to
	// convert an image with a backing file.
	Open Options
	// Overwrite allows an existing regular file to be replaced (the 2006
	// tool asked "y or n" first; the CLI asks, then sets this).
	Overwrite bool
}

// Qcow2Raw is the seed's `qcow2raw RAW_FILE QCOW_FILE` for images without a
// backing file: see Qcow2RawWith.
func Qcow2Raw(ctx context.Context, rawFile, qcowFile string) error {
	return Qcow2RawWith(ctx, rawFile, qcowFile, Qcow2RawOptions{})
}

// Qcow2RawWith writes the qcow image's contents to rawFile. A new file is
// created sparse: unallocated and all-zero clusters stay holes. An existing
// block device must be large enough and gets every byte, zeros included.
// An existing regular file is refused unless opts.Overwrite.
func Qcow2RawWith(ctx context.Context, rawFile, qcowFile string, opts Qcow2RawOptions) (err error) {
	o := opts.Open
	o.ReadOnly = true
	src, err := Open(qcowFile, o)
	if err != nil {
		return fmt.Errorf("qcow2raw: %w", err)
	}
	defer src.Close()
	size := src.Size()

	var f *os.File
	var created, device bool
	fi, statErr := os.Stat(rawFile)
	switch {
	case errors.Is(statErr, fs.ErrNotExist):
		f, err = os.OpenFile(rawFile, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		created = true
	case statErr != nil:
		return fmt.Errorf("qcow2raw: %w", statErr)
	case fi.Mode()&fs.ModeDevice != 0:
		device = true
		f, err = os.OpenFile(rawFile, os.O_WRONLY, 0)
	case fi.Mode().IsRegular():
		if !opts.Overwrite {
			return fmt.Errorf("qcow2raw: %s exists; refusing to overwrite it: %w", rawFile, fs.ErrExist)
		}
		f, err = os.OpenFile(rawFile, os.O_WRONLY|os.O_TRUNC, 0)
	default:
		return fmt.Errorf("qcow2raw: %s is neither a regular file nor a block device", rawFile)
	}
	if err != nil {
		return fmt.Errorf("qcow2raw: %w", err)
	}
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("qcow2raw: %w", cerr)
		}
		if err != nil && created {
			os.Remove(rawFile)
		}
	}()
	var zero func(off, n int64) error
	if device {
		devSize, err := f.Seek(0, 2)
		if err != nil {
			return fmt.Errorf("qcow2raw: %w", err)
		}
		if devSize < size {
			return fmt.Errorf("qcow2raw: device %s holds %d bytes, %d needed", rawFile, devSize, size)
		}
		zeros := make([]byte, copyChunk)
		zero = func(off, n int64) error {
			for n > 0 {
				k := min(n, int64(len(zeros)))
				if err := hostfile.WriteFull(f, zeros[:k], off); err != nil {
					return err
				}
				off, n = off+k, n-k
			}
			return nil
		}
	} else if err := f.Truncate(size); err != nil {
		return fmt.Errorf("qcow2raw: %w", err)
	}
	if err := copySparse(ctx, src, src.h.clusterSize, func(p []byte, off int64) error {
		return hostfile.WriteFull(f, p, off)
	}, zero); err != nil {
		return fmt.Errorf("qcow2raw: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("qcow2raw: %w", err)
	}
	return nil
}
