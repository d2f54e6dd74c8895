package qcow2

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// storage is the file under an image. Every write of ours goes through
// it, so tests can substitute a file that forgets unsynced writes and
// simulate a crash at any point.
type storage interface {
	io.ReaderAt
	io.WriterAt
	// Sync makes every completed write durable (fdatasync).
	Sync() error
	Size() (int64, error)
	// Truncate sets the file's length (the next Sync makes it durable).
	Truncate(n int64) error
	// Punch deallocates a range that no longer holds data (best effort).
	Punch(off, n int64)
	Close() error
}

type osFile struct{ f *os.File }

func (o osFile) ReadAt(p []byte, off int64) (int, error)  { return o.f.ReadAt(p, off) }
func (o osFile) WriteAt(p []byte, off int64) (int, error) { return o.f.WriteAt(p, off) }
func (o osFile) Close() error                             { return o.f.Close() }

func (o osFile) Sync() error {
	for {
		err := unix.Fdatasync(int(o.f.Fd()))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("qcow2: fdatasync %s: %w", o.f.Name(), err)
		}
		return nil
	}
}

func (o osFile) Size() (int64, error) {
	st, err := o.f.Stat()
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

func (o osFile) Truncate(n int64) error {
	if err := o.f.Truncate(n); err != nil {
		return fmt.Errorf("qcow2: %w", err)
	}
	return nil
}

func (o osFile) Punch(off, n int64) {
	// Failure only costs space (e.g. on filesystems without hole support).
	_ = unix.Fallocate(int(o.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

// readFull reads len(p) bytes at off; bytes past the end of the file read
// as zeros (a data cluster may legally end past EOF when only its head was
// ever written).
func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	clear(p[n:])
	return nil
}

// readExact reads len(p) bytes at off and fails on a short read.
func readExact(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// qemu's image locking (so qemu and we never write one image at once):
// open file description locks on single bytes. A user holding permission
// i takes a shared lock on byte 100+i; one that refuses to share it with
// others takes a shared lock on byte 200+i. Before taking its own, each
// user tests for conflicting locks of others.
const (
	lockPermBase   = 100
	lockSharedBase = 200
	permRead       = 0 // consistent read
	permWrite      = 1
	permResize     = 3
)

// ErrLocked: another process (qemu, or another of ours) holds the image
// in a way that conflicts with the requested open.
var ErrLocked = errors.New("image is in use by another process")

// lockImage takes qemu-compatible locks: a writer holds read, write and
// resize and shares none of write and resize; a reader holds read and
// does not share write. Filesystems without OFD locks are not locked.
func (o osFile) lockImage(writable bool) error {
	held := []int64{permRead}
	unshared := []int64{permWrite, permResize}
	if writable {
		held = append(held, permWrite, permResize)
	} else {
		unshared = []int64{permWrite}
	}
	conflict := func(b int64) (bool, error) {
		lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: b, Len: 1}
		if err := unix.FcntlFlock(o.f.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
			return false, err
		}
		return lk.Type != unix.F_UNLCK, nil
	}
	// Others refusing to share what we hold, or holding what we refuse.
	var test []int64
	for _, p := range held {
		test = append(test, lockSharedBase+p)
	}
	for _, p := range unshared {
		test = append(test, lockPermBase+p)
	}
	for _, b := range test {
		c, err := conflict(b)
		if err != nil {
			if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EOPNOTSUPP) {
				return nil
			}
			return fmt.Errorf("qcow2: lock %s: %w", o.f.Name(), err)
		}
		if c {
			return fmt.Errorf("qcow2: %s: %w (a lock conflicts at byte %d)", o.f.Name(), ErrLocked, b)
		}
	}
	var take []int64
	for _, p := range held {
		take = append(take, lockPermBase+p)
	}
	for _, p := range unshared {
		take = append(take, lockSharedBase+p)
	}
	for _, b := range take {
		lk := unix.Flock_t{Type: unix.F_RDLCK, Whence: 0, Start: b, Len: 1}
		if err := unix.FcntlFlock(o.f.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
			return fmt.Errorf("qcow2: %s: %w: %v", o.f.Name(), ErrLocked, err)
		}
	}
	return nil
}
