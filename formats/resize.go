package formats

import (
	"errors"
	"fmt"
	"os"

	"github.com/blktap-go/blktap/formats/qcow2"
	"github.com/blktap-go/blktap/formats/vhd"
	"golang.org/x/sys/unix"
)

// ErrNoResize: the format has no resize here (qemu-img's "Image format
// driver does not support resize").
var ErrNoResize = errors.New("image format driver does not support resize")

// ResizeFunc is given the current virtual size and returns the new one,
// or an error that stops the resize before anything is written.
type ResizeFunc func(cur int64) (int64, error)

// Resize changes the virtual size of the image at path, which must not be
// in use: the file is locked as our workers and qemu lock it (either
// holding it gives ErrLocked). newSize decides the
// size from the current one. backing opens a qcow2's backing file, whose
// length decides which new clusters must be written as zeros.
func Resize(format, path string, backing OpenFunc, newSize ResizeFunc) error {
	name, err := Normalize(format)
	if err != nil {
		return err
	}
	held, err := flockExclusive(path)
	if err != nil {
		return err
	}
	defer held.Close()
	switch name {
	case "raw":
		return resizeRaw(path, newSize)
	case "qcow2":
		img, err := qcow2.Open(path, qcow2.Options{Backing: backing})
		if err != nil {
			return err
		}
		return resizeClose(img, newSize)
	case "vhd":
		img, err := vhd.Open(path, vhd.Options{Backing: backing})
		if err != nil {
			return err
		}
		return resizeClose(img, newSize)
	}
	return fmt.Errorf("resize %s: %w (%s)", path, ErrNoResize, name)
}

// resizeClose resizes an open image to what newSize says, and closes it.
func resizeClose(img interface {
	Image
	Resize(int64) error
}, newSize ResizeFunc) error {
	size, err := newSize(img.Size())
	if err == nil {
		err = img.Resize(size)
	}
	return errors.Join(err, img.Close())
}

// resizeRaw truncates a regular file; a block device's size is the
// device's.
func resizeRaw(path string, newSize ResizeFunc) error {
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("raw: %w", err)
	}
	defer f.Close()
	if err := qcow2.LockFile(f); err != nil {
		if errors.Is(err, ErrLocked) {
			return fmt.Errorf("raw: %s: %w", path, ErrLocked)
		}
		return err
	}
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("raw: %w", err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("raw: %s: %w: not a regular file (a device's size is the device's)", path, ErrUnsupported)
	}
	size, err := newSize(st.Size())
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		return fmt.Errorf("raw: %w", err)
	}
	return f.Sync()
}

// AmendOptions say what Amend changes (qcow2 only).
type AmendOptions = qcow2.AmendOptions

// ErrNoAmend: the format has no settings to amend (qemu-img's "does not
// support option amendment").
var ErrNoAmend = errors.New("format driver does not support option amendment")

// Amend changes a qcow2 image's settings in place, with the file locked
// as Resize locks it.
func Amend(format, path string, backing OpenFunc, o AmendOptions) error {
	name, err := Normalize(format)
	if err != nil {
		return err
	}
	if name != "qcow2" {
		return fmt.Errorf("amend %s: %w (%s)", path, ErrNoAmend, name)
	}
	held, err := flockExclusive(path)
	if err != nil {
		return err
	}
	defer held.Close()
	img, err := qcow2.Open(path, qcow2.Options{Backing: backing})
	if err != nil {
		return err
	}
	return errors.Join(img.Amend(o), img.Close())
}

// flockExclusive takes, without waiting, the flock a blktap worker holds
// on every image file it serves (tapengine/worker), so an image a disk is
// using is refused whatever its format. The lock lives on its own open
// file; closing it releases the lock.
func flockExclusive(path string) (*os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		if err == unix.EWOULDBLOCK {
			return nil, fmt.Errorf("%s: %w (a blktap disk holds it)", path, ErrLocked)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return f, nil
}
