// Package crashfs is the in-memory file system the formats' power-cut
// tests run images on. It implements hostfile.FS and hostfile.File and
// models a disk with a volatile write cache:
//
//  1. Every write, truncate and punch is visible to reads at once, and is
//     also queued as pending on its file.
//  2. Sync makes the file's pending operations durable, in order.
//  3. A crash keeps each file's durable bytes plus some subset of its
//     pending operations, applied in order; the test's coin decides which.
//     Directory entries are not modelled: a created file exists at once
//     and survives any crash, and SyncDir does nothing.
//
// A test schedules the crash (Schedule) at the n-th operation of chosen
// kinds, drawn from its seed; that operation and every later mutation
// fail with ErrCrashed, reads still answer, and Crash returns what the
// disk would hold. FailWrites injects errors that are not crashes.
//
// It lives outside _test files so that the four formats' tests share it;
// only formats/ can import it and no production code does.
package crashfs

import (
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// ErrCrashed is what every mutation returns once the power is cut.
var ErrCrashed = errors.New("crashfs: simulated power loss")

// Kind is a set of operation kinds a crash schedule counts.
type Kind uint8

const (
	Writes Kind = 1 << iota
	Truncates
	Syncs
	Punches
)

// Op is one pending operation of a file: a write of Data at Off, or
// (Truncate) a length change to Off. A punch is a write of zeros.
type Op struct {
	Off      int64
	Data     []byte
	Truncate bool
}

func (op Op) apply(b []byte) []byte {
	if op.Truncate {
		if op.Off <= int64(len(b)) {
			return b[:op.Off]
		}
		return grow(b, op.Off)
	}
	b = grow(b, op.Off+int64(len(op.Data)))
	copy(b[op.Off:], op.Data)
	return b
}

func grow(b []byte, end int64) []byte {
	if end > int64(len(b)) {
		b = append(b, make([]byte, end-int64(len(b)))...)
	}
	return b
}

// FS is a crash-simulating file system. Safe for concurrent use; one
// mutex guards every file, which serialises the image's I/O as a single
// disk queue would.
type FS struct {
	mu    sync.Mutex
	files map[string]*node

	// The crash schedule: the countdown-th operation of the kinds in
	// counted crashes; countdown 0 means none is scheduled.
	counted   Kind
	countdown int
	crashed   bool

	writes    int                 // WriteAt calls so far, for FailWrites
	failWrite func(nth int) error // nil: no injected write errors
	syncs     int
}

type node struct {
	data    []byte // what reads see
	durable []byte // what survives any crash
	pending []Op
	kept    []bool // of the last Crash, for a failing test's log
}

// New is an empty file system.
func New() *FS { return &FS{files: map[string]*node{}} }

// FromImage is the file system a machine sees after a reboot: every file
// of img durable as it is.
func FromImage(img map[string][]byte) *FS {
	fs := New()
	for name, b := range img {
		fs.files[filepath.Clean(name)] = &node{data: slices.Clone(b), durable: slices.Clone(b)}
	}
	return fs
}

// NewFile is a single durable file holding b, for formats whose tests
// open an image straight on its file.
func NewFile(b []byte) *File {
	fs := FromImage(map[string][]byte{"/image": b})
	return &File{fs: fs, n: fs.files["/image"], name: "/image"}
}

// Schedule cuts the power at the n-th operation (1-based) of the given
// kinds from now on; n < 1 cancels the schedule.
func (fs *FS) Schedule(n int, kinds Kind) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	fs.countdown, fs.counted = max(n, 0), kinds
}

// FailWrites makes WriteAt fail with fail(nth) when that is not nil, nth
// counting every WriteAt on fs from 1. nil stops injecting.
func (fs *FS) FailWrites(fail func(nth int) error) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	fs.failWrite = fail
}

// Writes is how many WriteAt calls fs has seen.
func (fs *FS) Writes() int {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return fs.writes
}

// Syncs is how many Syncs succeeded.
func (fs *FS) Syncs() int {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return fs.syncs
}

// Crashed reports whether the power has been cut.
func (fs *FS) Crashed() bool {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return fs.crashed
}

// Crash cuts the power now (if a schedule has not already) and returns
// what each file holds after it: its durable bytes plus each pending
// operation for which keep returns true, in order. Files are visited in
// name order so a seed always flips the same coins.
func (fs *FS) Crash(keep func() bool) map[string][]byte {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	fs.crashed = true
	out := map[string][]byte{}
	for _, name := range slices.Sorted(maps.Keys(fs.files)) {
		n := fs.files[name]
		b := slices.Clone(n.durable)
		n.kept = n.kept[:0]
		for _, op := range n.pending {
			k := keep()
			n.kept = append(n.kept, k)
			if k {
				b = op.apply(b)
			}
		}
		out[name] = b
	}
	return out
}

// CrashNewestOnly cuts the power and keeps, of each file's pending
// operations, the newest alone: the harshest reordering a disk cache may
// do, since everything that was to precede it is lost.
func (fs *FS) CrashNewestOnly() map[string][]byte {
	fs.mu.Lock()
	var last []int
	for _, name := range slices.Sorted(maps.Keys(fs.files)) {
		last = append(last, len(fs.files[name].pending))
	}
	fs.mu.Unlock()
	file, i := 0, 0
	return fs.Crash(func() bool {
		for file < len(last) && i == last[file] {
			file, i = file+1, 0
		}
		i++
		return file < len(last) && i == last[file]
	})
}

// tickLocked counts one mutation of kind k against the schedule and says
// whether it may run.
func (fs *FS) tickLocked(k Kind) error {
	if fs.crashed {
		return ErrCrashed
	}
	if fs.countdown == 0 || fs.counted&k == 0 {
		return nil
	}
	fs.countdown--
	if fs.countdown == 0 {
		fs.crashed = true
		return ErrCrashed
	}
	return nil
}

// ReadFile is what reads of path see now, or nil if there is no such file.
func (fs *FS) ReadFile(path string) []byte {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if n, ok := fs.files[filepath.Clean(path)]; ok {
		return slices.Clone(n.data)
	}
	return nil
}

// SetFile makes path hold b, durable, as if written and synced long ago.
func (fs *FS) SetFile(path string, b []byte) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	fs.files[filepath.Clean(path)] = &node{data: slices.Clone(b), durable: slices.Clone(b)}
}

func (fs *FS) Open(path string, flag int, perm os.FileMode) (hostfile.File, error) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	path = filepath.Clean(path)
	n, ok := fs.files[path]
	switch {
	case ok && flag&os.O_CREATE != 0 && flag&os.O_EXCL != 0:
		return nil, &os.PathError{Op: "open", Path: path, Err: os.ErrExist}
	case !ok && flag&os.O_CREATE == 0:
		return nil, &os.PathError{Op: "open", Path: path, Err: os.ErrNotExist}
	case !ok:
		if fs.crashed {
			return nil, ErrCrashed
		}
		n = &node{}
		fs.files[path] = n
	}
	return &File{fs: fs, n: n, name: path, readOnly: flag&(os.O_RDWR|os.O_WRONLY) == 0}, nil
}

// OpenIn confines names lexically only: the file system has no symlinks.
func (fs *FS) OpenIn(dir, name string, flag int, perm os.FileMode, confined bool) (hostfile.File, error) {
	if confined && !filepath.IsLocal(name) {
		return nil, fmt.Errorf("%w: %q", hostfile.ErrEscape, name)
	}
	if !filepath.IsAbs(name) {
		name = filepath.Join(dir, name)
	}
	return fs.Open(name, flag, perm)
}

func (fs *FS) SyncDir(string) error { return nil }

func (fs *FS) Remove(path string) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if fs.crashed {
		return ErrCrashed
	}
	delete(fs.files, filepath.Clean(path))
	return nil
}

// File is an open file of an FS.
type File struct {
	fs       *FS
	n        *node
	name     string
	readOnly bool
}

var (
	_ hostfile.File = (*File)(nil)
	_ hostfile.FS   = (*FS)(nil)
)

// FS is the file system f belongs to.
func (f *File) FS() *FS { return f.fs }

// Bytes is what reads of f see now.
func (f *File) Bytes() []byte {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	return slices.Clone(f.n.data)
}

// Crash cuts the power and returns what f holds after it (FS.Crash).
func (f *File) Crash(keep func() bool) []byte {
	return f.fs.Crash(keep)[f.name]
}

// Pending is f's unsynced operations and, for each, whether the last
// Crash kept it: what a failing power-cut test logs.
func (f *File) Pending() ([]Op, []bool) {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	return slices.Clone(f.n.pending), slices.Clone(f.n.kept)
}

func (f *File) ReadAt(p []byte, off int64) (int, error) {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if off < 0 {
		return 0, fmt.Errorf("crashfs: read at negative offset %d", off)
	}
	if off >= int64(len(f.n.data)) {
		return 0, io.EOF
	}
	n := copy(p, f.n.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (f *File) WriteAt(p []byte, off int64) (int, error) {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	f.fs.writes++
	if f.fs.failWrite != nil {
		if err := f.fs.failWrite(f.fs.writes); err != nil {
			return 0, err
		}
	}
	if off < 0 {
		return 0, fmt.Errorf("crashfs: write at negative offset %d", off)
	}
	if f.readOnly {
		return 0, os.ErrPermission
	}
	if err := f.fs.tickLocked(Writes); err != nil {
		return 0, err
	}
	f.mutateLocked(Op{Off: off, Data: slices.Clone(p)})
	return len(p), nil
}

func (f *File) mutateLocked(op Op) {
	f.n.data = op.apply(f.n.data)
	f.n.pending = append(f.n.pending, op)
}

func (f *File) Truncate(size int64) error {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if err := f.fs.tickLocked(Truncates); err != nil {
		return err
	}
	f.mutateLocked(Op{Off: size, Truncate: true})
	return nil
}

// PunchHole zeroes the part of the range inside the file; a hole reads as
// zeros, and a crash may keep or lose it like any write.
func (f *File) PunchHole(off, n int64) error {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if err := f.fs.tickLocked(Punches); err != nil {
		return err
	}
	n = min(n, int64(len(f.n.data))-off)
	if n > 0 {
		f.mutateLocked(Op{Off: off, Data: make([]byte, n)})
	}
	return nil
}

func (f *File) Sync() error {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if err := f.fs.tickLocked(Syncs); err != nil {
		return err
	}
	for _, op := range f.n.pending {
		f.n.durable = op.apply(f.n.durable)
	}
	f.n.pending = nil
	f.fs.syncs++
	return nil
}

func (f *File) Size() (int64, error) {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	return int64(len(f.n.data)), nil
}

func (f *File) Close() error { return nil }
