package vmdk

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// file is what the format needs of a host file. Tests substitute a memory
// file that keeps only synced writes across a simulated crash.
type file interface {
	io.ReaderAt
	io.WriterAt
	Sync() error // data durable (fdatasync)
	Size() (int64, error)
	Truncate(int64) error
	Close() error
}

// fileSystem opens host files. inDir opens name relative to dir; when
// confined it refuses absolute names, ".." escapes and symlinks that leave
// dir.
type fileSystem interface {
	open(path string, flag int, perm os.FileMode) (file, error)
	inDir(dir, name string, flag int, perm os.FileMode, confined bool) (file, error)
	syncDir(dir string) error
	remove(path string) error
}

type osFS struct{}

type osFile struct{ *os.File }

func (f osFile) Sync() error          { return hostfile.Fdatasync(f.File) }
func (f osFile) Size() (int64, error) { return hostfile.Size(f.File) }

// punchHole deallocates a range of a flat extent, keeping the size; the
// range then reads as zeros.
func (f osFile) punchHole(off, n int64) error {
	return hostfile.PunchHole(f.File, off, n)
}

func (osFS) open(path string, flag int, perm os.FileMode) (file, error) {
	f, err := os.OpenFile(path, flag, perm)
	if err != nil {
		return nil, err
	}
	return osFile{f}, nil
}

var errEscape = errors.New("extent path leaves the image directory")

func (fs osFS) inDir(dir, name string, flag int, perm os.FileMode, confined bool) (file, error) {
	if !confined {
		if !filepath.IsAbs(name) {
			name = filepath.Join(dir, name)
		}
		return fs.open(name, flag, perm)
	}
	if !filepath.IsLocal(name) {
		return nil, fmt.Errorf("%w: %q", errEscape, name)
	}
	// os.Root also refuses symlinks that point outside dir.
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	f, err := root.OpenFile(name, flag, perm)
	if err != nil {
		// os.Root's escape error is not exported: name the refusal
		// ourselves when the name resolves outside dir.
		if real, e1 := filepath.EvalSymlinks(filepath.Join(dir, name)); e1 == nil {
			if rd, e2 := filepath.EvalSymlinks(dir); e2 == nil {
				if rel, e3 := filepath.Rel(rd, real); e3 == nil && !filepath.IsLocal(rel) {
					return nil, fmt.Errorf("%w: %q resolves to %s", errEscape, name, real)
				}
			}
		}
		return nil, err
	}
	return osFile{f}, nil
}

func (osFS) remove(path string) error { return os.Remove(path) }

func (osFS) syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}

// mapFlat reports the runs of [off, off+n) of a flat file as data, or as
// zero where the host file has a hole (SEEK_HOLE) or ends. Files that
// cannot seek for holes are all data. emit gets offsets relative to off.
func mapFlat(f file, off, n int64, emit func(o, n int64, k image.ExtentKind)) {
	of, ok := f.(osFile)
	if !ok {
		emit(0, n, image.Data)
		return
	}
	fd := int(of.Fd())
	end := off + n
	for pos := off; pos < end; {
		d, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if err == unix.ENXIO { // no data after pos
			emit(pos-off, end-pos, image.Zero)
			return
		}
		if err != nil {
			emit(pos-off, end-pos, image.Data)
			return
		}
		if d > pos {
			d = min(d, end)
			emit(pos-off, d-pos, image.Zero)
			pos = d
			if pos >= end {
				return
			}
		}
		h, err := unix.Seek(fd, pos, unix.SEEK_HOLE)
		if err != nil || h <= pos {
			emit(pos-off, end-pos, image.Data)
			return
		}
		h = min(h, end)
		emit(pos-off, h-pos, image.Data)
		pos = h
	}
}
