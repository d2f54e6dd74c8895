package hostfile

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// File is the host file under an image: every format reads, writes,
// syncs, truncates and punches its files through it and nothing else, so
// a test can put a file underneath that fails chosen operations or keeps
// only what was synced across a simulated power cut (formats/internal/crashfs).
// OSFile is the real one.
type File interface {
	io.ReaderAt
	io.WriterAt
	// Sync makes every completed write and truncate durable (fdatasync).
	Sync() error
	// Size is the current length of the file.
	Size() (int64, error)
	// Truncate sets the file's length; the next Sync makes it durable.
	Truncate(size int64) error
	// PunchHole deallocates [off, off+n) without changing the size, so
	// the range reads as zeros. The error is the file system's: each
	// caller decides whether EOPNOTSUPP matters to it.
	PunchHole(off, n int64) error
	Close() error
}

// Sparse is implemented by files that can tell where their holes are
// (SEEK_DATA, SEEK_HOLE). Files that cannot are all data.
type Sparse interface {
	// DataAfter is where the next data at or after off starts, or the
	// file's size if there is none.
	DataAfter(off int64) (int64, error)
	// HoleAfter is where the next hole at or after off starts.
	HoleAfter(off int64) (int64, error)
}

// FS opens, removes and syncs the directories of host files. Images made
// of several files (VMDK extents, backing chains) go through it so a test
// can see every file of the image at the moment of a crash.
type FS interface {
	Open(path string, flag int, perm os.FileMode) (File, error)
	// OpenIn opens name relative to dir (an absolute name as it is). When
	// confined it refuses absolute names, ".." and symlinks that leave
	// dir, failing with ErrEscape: the name comes from a tenant's image.
	OpenIn(dir, name string, flag int, perm os.FileMode, confined bool) (File, error)
	// SyncDir makes the directory's entries durable (a created or
	// removed file survives a crash).
	SyncDir(dir string) error
	Remove(path string) error
}

// ErrEscape: a confined open named a file outside its directory.
var ErrEscape = errors.New("path leaves the image directory")

// OSFile is a File on the host's file system.
type OSFile struct{ *os.File }

var (
	_ File   = OSFile{}
	_ Sparse = OSFile{}
	_ FS     = OSFS{}
)

// Sync is fdatasync: the size is metadata it does flush, and nothing else
// of the inode matters to an image.
func (o OSFile) Sync() error          { return Fdatasync(o.File) }
func (o OSFile) Size() (int64, error) { return Size(o.File) }

func (o OSFile) PunchHole(off, n int64) error { return PunchHole(o.File, off, n) }

func (o OSFile) DataAfter(off int64) (int64, error) {
	n, err := unix.Seek(int(o.File.Fd()), off, unix.SEEK_DATA)
	if err == unix.ENXIO { // no data at or after off
		return o.Size()
	}
	return n, err
}

func (o OSFile) HoleAfter(off int64) (int64, error) {
	return unix.Seek(int(o.File.Fd()), off, unix.SEEK_HOLE)
}

// OSFS is the host's file system.
type OSFS struct{}

func (OSFS) Open(path string, flag int, perm os.FileMode) (File, error) {
	f, err := os.OpenFile(path, flag, perm)
	if err != nil {
		return nil, err
	}
	return OSFile{f}, nil
}

func (fs OSFS) OpenIn(dir, name string, flag int, perm os.FileMode, confined bool) (File, error) {
	if !confined {
		if !filepath.IsAbs(name) {
			name = filepath.Join(dir, name)
		}
		return fs.Open(name, flag, perm)
	}
	if !filepath.IsLocal(name) {
		return nil, fmt.Errorf("%w: %q", ErrEscape, name)
	}
	// os.Root also refuses symlinks that point outside dir.
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	f, err := root.OpenFile(name, flag, perm)
	if err != nil {
		if real, ok := escapes(dir, name); ok {
			return nil, fmt.Errorf("%w: %q resolves to %s", ErrEscape, name, real)
		}
		return nil, err
	}
	return OSFile{f}, nil
}

// escapes reports whether name resolves outside dir: os.Root's own
// escape error is not exported, so the refusal is named here.
func escapes(dir, name string) (string, bool) {
	real, err := filepath.EvalSymlinks(filepath.Join(dir, name))
	if err != nil {
		return "", false
	}
	rd, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return "", false
	}
	rel, err := filepath.Rel(rd, real)
	return real, err == nil && !filepath.IsLocal(rel)
}

func (OSFS) Remove(path string) error { return os.Remove(path) }

func (OSFS) SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	// Some file systems cannot fsync a directory (EINVAL); their entries
	// are as durable as they will get.
	if err := d.Sync(); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}
