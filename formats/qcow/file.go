package qcow

import (
	"errors"
	"io"
	"os"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// storage is the file under an image. It is an interface so tests can put
// a layer underneath that fails chosen writes or forgets unsynced ones
// (STYLE.md 13).
type storage interface {
	io.ReaderAt
	io.WriterAt
	// Sync makes every completed write durable (fdatasync).
	Sync() error
	// Size is the current length of the file.
	Size() (int64, error)
	Close() error
}

// holePuncher is implemented by storages that can give a range's space
// back (fallocate PUNCH_HOLE); Discard uses it when it can.
type holePuncher interface {
	PunchHole(off, length int64) error
}

type osFile struct{ *os.File }

func (o osFile) Sync() error          { return hostfile.Fdatasync(o.File) }
func (o osFile) Size() (int64, error) { return hostfile.Size(o.File) }

func (o osFile) PunchHole(off, length int64) error {
	err := hostfile.PunchHole(o.File, off, length)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
		return nil // the range already reads as zeros through the L2 entry; space is merely kept
	}
	return err
}
