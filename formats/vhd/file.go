package vhd

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// file is the part of *os.File the package uses. It is an interface so
// tests can put a layer underneath that fails chosen writes or forgets
// whatever was not synced (STYLE.md 13).
type file interface {
	io.ReaderAt
	io.WriterAt
	// Sync makes every completed write durable (fdatasync).
	Sync() error
	// Size is the current length of the file.
	Size() (int64, error)
	Truncate(size int64) error
	Close() error
}

// puncher is implemented by files that can deallocate a range so that it
// reads as zeros without changing the file's size.
type puncher interface {
	Punch(off, n int64) error
}

// sparseFile is implemented by files that can tell their holes.
type sparseFile interface {
	dataAfter(off int64) (int64, error)
	holeAfter(off int64) (int64, error)
}

type osFile struct{ f *os.File }

func (o osFile) ReadAt(p []byte, off int64) (int, error)  { return o.f.ReadAt(p, off) }
func (o osFile) WriteAt(p []byte, off int64) (int, error) { return o.f.WriteAt(p, off) }
func (o osFile) Truncate(n int64) error                   { return o.f.Truncate(n) }
func (o osFile) Close() error                             { return o.f.Close() }

func (o osFile) Sync() error {
	// fdatasync is enough: the file's size is metadata it does flush,
	// and nothing else of the inode matters to the image.
	for {
		err := unix.Fdatasync(int(o.f.Fd()))
		if err != unix.EINTR {
			if err != nil {
				return fmt.Errorf("fdatasync %s: %w", o.f.Name(), err)
			}
			return nil
		}
	}
}

func (o osFile) Size() (int64, error) {
	st, err := o.f.Stat()
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

// dataAfter returns where the next data at or after off starts in the
// file, or the file's size if none (SEEK_DATA).
func (o osFile) dataAfter(off int64) (int64, error) {
	n, err := unix.Seek(int(o.f.Fd()), off, unix.SEEK_DATA)
	if err == unix.ENXIO {
		return o.Size()
	}
	return n, err
}

// holeAfter returns where the next hole at or after off starts (SEEK_HOLE).
func (o osFile) holeAfter(off int64) (int64, error) {
	return unix.Seek(int(o.f.Fd()), off, unix.SEEK_HOLE)
}

func (o osFile) Punch(off, n int64) error {
	return unix.Fallocate(int(o.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

// readFull reads exactly len(p) bytes at off; a short read is an error
// that names the range, never a silent zero fill.
func readFull(f io.ReaderAt, p []byte, off int64) error {
	n, err := f.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("read %d bytes at %d: got %d: %w", len(p), off, n, err)
}

func writeFull(f io.WriterAt, p []byte, off int64) error {
	n, err := f.WriteAt(p, off)
	if err == nil && n != len(p) {
		err = io.ErrShortWrite
	}
	if err != nil {
		return fmt.Errorf("write %d bytes at %d: %w", len(p), off, err)
	}
	return nil
}
