package qcow2

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

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
func lockImage(f *os.File, writable bool) error {
	held := []int64{permRead}
	unshared := []int64{permWrite, permResize}
	if writable {
		held = append(held, permWrite, permResize)
	} else {
		unshared = []int64{permWrite}
	}
	conflict := func(b int64) (bool, error) {
		lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: b, Len: 1}
		if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
			return false, err
		}
		return lk.Type != unix.F_UNLCK, nil
	}
	// Others refusing to share what we hold, or holding what we refuse.
	for _, b := range lockBytes(held, lockSharedBase, unshared, lockPermBase) {
		c, err := conflict(b)
		if err != nil {
			if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EOPNOTSUPP) {
				return nil
			}
			return fmt.Errorf("qcow2: lock %s: %w", f.Name(), err)
		}
		if c {
			return fmt.Errorf("qcow2: %s: %w (a lock conflicts at byte %d)", f.Name(), ErrLocked, b)
		}
	}
	for _, b := range lockBytes(held, lockPermBase, unshared, lockSharedBase) {
		lk := unix.Flock_t{Type: unix.F_RDLCK, Whence: 0, Start: b, Len: 1}
		if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &lk); err != nil {
			return fmt.Errorf("qcow2: %s: %w: %v", f.Name(), ErrLocked, err)
		}
	}
	return nil
}

// lockBytes lists the lock bytes of the held permissions from heldBase on,
// then those of the unshared ones from unsharedBase on. Testing and taking
// use the two bases crossed.
func lockBytes(held []int64, heldBase int64, unshared []int64, unsharedBase int64) []int64 {
	var out []int64
	for _, p := range held {
		out = append(out, heldBase+p)
	}
	for _, p := range unshared {
		out = append(out, unsharedBase+p)
	}
	return out
}
