package vhd

import (
	"io"
	"os"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/internal/hostfile"
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

type osFile struct{ *os.File }

// Sync: fdatasync is enough: the file's size is metadata it does flush,
// and nothing else of the inode matters to the image.
func (o osFile) Sync() error          { return hostfile.Fdatasync(o.File) }
func (o osFile) Size() (int64, error) { return hostfile.Size(o.File) }

// dataAfter returns where the next data at or after off starts in the
// file, or the file's size if none (SEEK_DATA).
func (o osFile) dataAfter(off int64) (int64, error) {
	n, err := unix.Seek(int(o.File.Fd()), off, unix.SEEK_DATA)
	if err == unix.ENXIO {
		return o.Size()
	}
	return n, err
}

// holeAfter returns where the next hole at or after off starts (SEEK_HOLE).
func (o osFile) holeAfter(off int64) (int64, error) {
	return unix.Seek(int(o.File.Fd()), off, unix.SEEK_HOLE)
}

func (o osFile) Punch(off, n int64) error {
	return hostfile.PunchHole(o.File, off, n)
}
