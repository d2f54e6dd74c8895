// Package raw serves a plain file or block device as a disk image: byte n
// of the disk is byte n of the file. It is the "raw" format (alias "aio",
// the 2006 blktap driver name).
//
// An *Image is safe for concurrent use: reads and writes are positional
// (pread/pwrite) on one descriptor, and every other call either uses a
// syscall that does not depend on the file offset or only uses the value a
// syscall returns.
//
// Caller's duties:
//
//  1. Create the image with Create (it never overwrites), or point Open at
//     an existing file or block device.
//  2. Open it read-only (Options.ReadOnly) whenever the consumer must not
//     write: the descriptor is then O_RDONLY and WriteAt/Discard return
//     image.ErrReadOnly without touching the file.
//  3. Call Flush before acknowledging a flush to a guest: it is fdatasync.
//  4. Close it once; calls after Close return image.ErrClosed.
//
// The size is fixed when the image is opened (fstat for files,
// BLKGETSIZE64 for block devices); a file that another process shrinks
// afterwards gives io.ErrUnexpectedEOF on reads past its new end, never a
// silent short read.
package raw

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/guard"
	"github.com/blktap-go/blktap/formats/internal/uring"
)

// Name is the format's canonical name.
const Name = "raw"

// Options control Open.
type Options struct {
	// ReadOnly opens the file O_RDONLY and refuses writes and discards.
	ReadOnly bool
	// URing does reads and writes through io_uring (uring.go) where
	// URingSupported says it works, and pread/pwrite elsewhere.
	URing bool
}

// Image is an open raw image. It implements image.Image.
type Image struct {
	f        *os.File
	path     string
	size     int64
	readOnly bool
	blockDev bool
	guard    guard.Guard // closed, read-only and range checks
	rings    *uring.Pool // nil: pread/pwrite only
}

var _ image.Image = (*Image)(nil)

// Open opens the raw image at path: a regular file or a block device.
func Open(path string, opts Options) (*Image, error) {
	flag := os.O_RDWR
	if opts.ReadOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("raw: open: %w", err)
	}
	img, err := newImage(f, path, opts)
	if err != nil {
		f.Close()
		return nil, err
	}
	return img, nil
}

func newImage(f *os.File, path string, opts Options) (*Image, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("raw: stat %s: %w", path, err)
	}
	img := &Image{f: f, path: path, readOnly: opts.ReadOnly}
	img.guard.SetLabel("raw: " + path)
	if opts.URing && URingSupported() == nil {
		img.rings = uring.NewPool(maxRings)
	}
	mode := st.Mode()
	switch {
	case mode.IsRegular():
		img.size = st.Size()
	case mode&fs.ModeDevice != 0 && mode&fs.ModeCharDevice == 0:
		img.blockDev = true
		if err := img.control(func(fd int) error {
			n, err := unix.IoctlGetUint64(fd, unix.BLKGETSIZE64)
			if err != nil {
				return err
			}
			if n > 1<<63-1 {
				return fmt.Errorf("size %d does not fit in int64", n)
			}
			img.size = int64(n)
			return nil
		}); err != nil {
			return nil, fmt.Errorf("raw: %s: BLKGETSIZE64: %w", path, err)
		}
	default:
		return nil, fmt.Errorf("raw: %s: %w: not a regular file or block device (mode %v)",
			path, image.ErrWrongFormat, mode)
	}
	return img, nil
}

// Create makes a new raw image of size bytes at path as a sparse file. It
// never overwrites: if path exists the error wraps fs.ErrExist.
func Create(path string, size int64) (err error) {
	if size < 0 {
		return fmt.Errorf("raw: create %s: negative size %d", path, size)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return fmt.Errorf("raw: create: %w", err)
	}
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("raw: create %s: %w", path, cerr)
		}
		if err != nil {
			// Only we can have made this file (O_EXCL), so removing it
			// cannot destroy anyone's data.
			os.Remove(path)
		}
	}()
	if err := f.Truncate(size); err != nil {
		return fmt.Errorf("raw: create %s: %w", path, err)
	}
	// Durable before the caller records that the image exists.
	if err := f.Sync(); err != nil {
		return fmt.Errorf("raw: create %s: %w", path, err)
	}
	return nil
}

// control runs fn on the descriptor while the os.File guarantees it stays
// open, so a concurrent Close cannot hand the number to another file.
func (img *Image) control(fn func(fd int) error) error {
	rc, err := img.f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		if img.guard.Closed() {
			// Close won the race; say so the way a later call would.
			return fmt.Errorf("%w: %w", image.ErrClosed, err)
		}
		return err
	}
	return ferr
}

// Size returns the virtual size in bytes.
func (img *Image) Size() int64 { return img.size }

// ReadOnly reports whether the image was opened read-only.
func (img *Image) ReadOnly() bool { return img.readOnly }

// ReadAt reads len(p) bytes at off. It never returns io.EOF for a range
// inside Size.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if err := img.guard.Span(off, int64(len(p)), img.size); err != nil {
		return 0, err
	}
	if img.rings != nil {
		if n, ok, err := img.ioURing(false, p, off); ok {
			return n, err
		}
	}
	n, err := img.f.ReadAt(p, off)
	if n == len(p) {
		return n, nil
	}
	if errors.Is(err, io.EOF) || err == nil {
		// The range is inside the size we saw at open, so the file shrank.
		return n, fmt.Errorf("raw: %s: read %d of %d bytes at offset %d (file shorter than its size %d): %w",
			img.path, n, len(p), off, img.size, io.ErrUnexpectedEOF)
	}
	return n, img.ioErr("read", err)
}

// ioErr wraps an I/O error; one that raced with Close gets the class
// image.ErrClosed, as a call after Close would.
func (img *Image) ioErr(op string, err error) error {
	if errors.Is(err, os.ErrClosed) {
		return fmt.Errorf("raw: %s: %s: %w: %w", img.path, op, image.ErrClosed, err)
	}
	return fmt.Errorf("raw: %s: %w", op, err)
}

// WriteAt writes p at off; the data is in the page cache when it returns.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if err := img.guard.Change("write", img.readOnly, off, int64(len(p)), img.size); err != nil {
		return 0, err
	}
	if img.rings != nil {
		if n, ok, err := img.ioURing(true, p, off); ok {
			return n, err
		}
	}
	n, err := img.f.WriteAt(p, off)
	if err != nil {
		return n, img.ioErr("write", err)
	}
	return n, nil
}

// Flush makes every completed write durable (fdatasync).
func (img *Image) Flush() error {
	if err := img.guard.Open(); err != nil {
		return err
	}
	if img.readOnly {
		return nil
	}
	if err := img.control(unix.Fdatasync); err != nil {
		return fmt.Errorf("raw: %s: fdatasync: %w", img.path, err)
	}
	return nil
}

// Discard deallocates [off, off+length) so it reads as zeros. Files get a
// punched hole; block devices get fallocate's zeroing discard, which fails
// rather than leaving stale data. Both return image.ErrUnsupported when the
// file system or device cannot do it.
func (img *Image) Discard(off, length int64) error {
	if err := img.guard.Change("discard", img.readOnly, off, length, img.size); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	// BLKDISCARD is not used for block devices: it may leave old data
	// readable, and the contract says a discarded range reads as zeros.
	// fallocate(PUNCH_HOLE) on a block device unmaps only where the device
	// guarantees zeros afterwards, and says EOPNOTSUPP otherwise.
	err := img.control(func(fd int) error {
		return unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	})
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.ENOSYS), errors.Is(err, unix.ENODEV):
		return fmt.Errorf("raw: %s: discard: %w: %w", img.path, image.ErrUnsupported, err)
	default:
		return fmt.Errorf("raw: %s: discard: %w", img.path, err)
	}
}

// Map describes [off, off+length) as Data and Hole extents using
// lseek(SEEK_DATA/SEEK_HOLE). Where the file system or device cannot
// answer, the whole range is reported as Data, which is always safe.
func (img *Image) Map(off, length int64) ([]image.Extent, error) {
	if err := img.guard.Span(off, length, img.size); err != nil {
		return nil, err
	}
	end := off + length
	if length == 0 {
		return nil, nil
	}
	if img.blockDev {
		return []image.Extent{{Offset: off, Length: length, Kind: image.Data}}, nil
	}
	var out []image.Extent
	add := func(start, stop int64, kind image.ExtentKind) {
		if stop <= start {
			return
		}
		if n := len(out); n > 0 && out[n-1].Kind == kind && out[n-1].Offset+out[n-1].Length == start {
			out[n-1].Length += stop - start
			return
		}
		out = append(out, image.Extent{Offset: start, Length: stop - start, Kind: kind})
	}
	err := img.control(func(fd int) error {
		// lseek moves the shared file offset, which nothing else uses:
		// reads and writes are positional, and only the returned value
		// is used here, so concurrent Map calls do not interfere.
		stalls := 0
		for pos := off; pos < end; {
			data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
			if errors.Is(err, unix.ENXIO) {
				// No data at or after pos: the rest is a hole. The
				// file may also have shrunk; zeros is what a read
				// past the new end would not give, but Map only
				// promises allocation, and a hole is the truth.
				add(pos, end, image.Hole)
				return nil
			}
			if err != nil {
				return err
			}
			if data > pos {
				add(pos, min(data, end), image.Hole)
			}
			if data >= end {
				return nil
			}
			hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
			if err != nil {
				return err
			}
			if hole == data && stalls < 64 {
				// A concurrent discard turned the data at data into
				// a hole between the two seeks: look again from there.
				stalls++
				pos = data
				continue
			}
			if hole <= data {
				// A file system answering nonsense (or a file
				// rewritten faster than we can look) would loop
				// forever; report the rest as data, which is safe.
				add(data, end, image.Data)
				return nil
			}
			add(data, min(hole, end), image.Data)
			pos = hole
		}
		return nil
	})
	if err != nil {
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
			return []image.Extent{{Offset: off, Length: length, Kind: image.Data}}, nil
		}
		return nil, fmt.Errorf("raw: %s: map: %w", img.path, err)
	}
	return out, nil
}

// Close flushes and closes the image. A second Close returns
// image.ErrClosed.
func (img *Image) Close() error {
	if img.guard.Close() {
		return fmt.Errorf("raw: %s: %w", img.path, image.ErrClosed)
	}
	if img.rings != nil {
		img.rings.Close()
	}
	var ferr error
	if !img.readOnly {
		if err := img.control(unix.Fdatasync); err != nil {
			ferr = fmt.Errorf("raw: %s: fdatasync: %w", img.path, err)
		}
	}
	if err := img.f.Close(); err != nil && ferr == nil {
		ferr = fmt.Errorf("raw: %s: close: %w", img.path, err)
	}
	return ferr
}
