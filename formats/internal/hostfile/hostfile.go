// Package hostfile is the one layer through which the image formats reach
// their host files: File (read, write, sync, size, truncate, punch) and
// FS (open, confined open, remove, directory sync), with OSFile and OSFS
// the real ones and formats/internal/crashfs the power-cut fake. It also
// holds what every format needs on top: a sync that makes written data
// durable without the inode's timestamps (fdatasync), reads and writes
// of exactly a whole buffer, and GroupSync to share syncs.
package hostfile

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// Fdatasync makes every completed write to f durable: the data and the
// size, which is all an image needs of the inode. Retried on EINTR.
func Fdatasync(f *os.File) error {
	for {
		err := unix.Fdatasync(int(f.Fd()))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("fdatasync %s: %w", f.Name(), err)
		}
		return nil
	}
}

// Size is f's current length.
func Size(f *os.File) (int64, error) {
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

// PunchHole deallocates [off, off+n) of f without changing its size, so
// the range reads as zeros. The error is the file system's: callers
// decide whether EOPNOTSUPP matters.
func PunchHole(f *os.File, off, n int64) error {
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

// ReadFull reads exactly len(p) bytes at off; a short read is an error
// that names the range (wrapping io.ErrUnexpectedEOF), never a silent
// zero fill.
func ReadFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("read %d bytes at %d: got %d: %w", len(p), off, n, err)
}

// ReadZeroed reads len(p) bytes at off; bytes past the end of the file
// read as zeros (a cluster may legally reach past EOF when only its head
// was ever written; qemu reads it the same way).
func ReadZeroed(r io.ReaderAt, p []byte, off int64) error {
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

// WriteFull writes all of p at off; a short write without an error is
// io.ErrShortWrite.
func WriteFull(w io.WriterAt, p []byte, off int64) error {
	n, err := w.WriteAt(p, off)
	if err == nil && n != len(p) {
		err = io.ErrShortWrite
	}
	if err != nil {
		return fmt.Errorf("write %d bytes at %d: %w", len(p), off, err)
	}
	return nil
}

// GroupSync lets concurrent writers share fdatasyncs. A writer that needs
// its completed writes durable before it writes the pointer naming them
// asks for one sync that began after its call; every writer waiting at
// that moment is served by the same sync, so a queue of allocating writes
// costs about one fdatasync per round trip, not one per write. The zero
// value is ready for use; safe for concurrent use.
type GroupSync struct {
	mu      sync.Mutex
	cond    sync.Cond
	started uint64 // syncs begun
	done    uint64 // syncs finished
	running bool
	// err is sticky: after a failed fdatasync the kernel may have dropped
	// the dirty pages it could not write, so a later sync that succeeds
	// proves nothing about writes made before the failure.
	err error
}

// Sync returns once one call of sync, shared with concurrent callers, has
// run from start to end after Sync was called.
func (g *GroupSync) Sync(sync func() error) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.cond.L == nil {
		g.cond.L = &g.mu
	}
	target := g.started + 1
	for g.done < target && g.err == nil {
		if g.running {
			g.cond.Wait()
			continue
		}
		g.running = true
		g.started++
		n := g.started
		g.mu.Unlock()
		err := sync()
		g.mu.Lock()
		g.running, g.done = false, n
		if err != nil && g.err == nil {
			g.err = err
		}
		g.cond.Broadcast()
	}
	return g.err
}

// OpenWith opens the image file at path, read-only or read-write, and
// hands it to use; when use fails the file is closed, since nothing else
// holds it. An error from the open itself is prefixed with errPrefix, one
// from use is returned as it is. Every format opens its file this way.
func OpenWith[T any](path string, readOnly bool, errPrefix string, use func(*os.File) (T, error)) (T, error) {
	var zero T
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return zero, fmt.Errorf("%s: %w", errPrefix, err)
	}
	v, err := use(f)
	if err != nil {
		f.Close()
		return zero, err
	}
	return v, nil
}
