package vmdk

import (
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
)

// memFS is an in-memory file system that simulates power loss: each file
// keeps its last synced contents plus the writes since; a crash keeps the
// synced state and a random subset of the later writes (in order), which
// is what a disk with a volatile cache may do.
type memFS struct {
	mu     sync.Mutex
	files  map[string]*memFile
	budget int // mutating calls left before the crash; <0: no crash
	// syncOnly spends the budget on syncs alone: the crash then comes just
	// before a sync, when the most writes are in flight.
	syncOnly bool
	frozen   bool
	snap     map[string][]byte
	r        *rand.Rand
}

type memOp struct {
	off   int64
	b     []byte
	trunc bool
}

type memFile struct {
	data    []byte
	durable []byte
	pending []memOp
}

var errCrashed = errors.New("simulated power loss")

func newMemFS(seed uint64, budget int) *memFS {
	return &memFS{files: map[string]*memFile{}, budget: budget, r: rand.New(rand.NewPCG(seed, 99))}
}

// fromSnapshot is the file system a machine sees after reboot.
func fromSnapshot(snap map[string][]byte) *memFS {
	fs := &memFS{files: map[string]*memFile{}, budget: -1}
	for k, v := range snap {
		fs.files[k] = &memFile{data: slices.Clone(v), durable: slices.Clone(v)}
	}
	return fs
}

// tickLocked spends one mutating call; the call that runs out crashes.
func (fs *memFS) tickLocked(sync bool) error {
	if fs.frozen {
		return errCrashed
	}
	if fs.budget < 0 || fs.syncOnly && !sync {
		return nil
	}
	fs.budget--
	if fs.budget > 0 {
		return nil
	}
	fs.frozen = true
	fs.snap = map[string][]byte{}
	for k, f := range fs.files {
		d := slices.Clone(f.durable)
		for _, op := range f.pending {
			if fs.r.IntN(2) == 0 {
				continue
			}
			d = apply(d, op)
		}
		fs.snap[k] = d
	}
	return errCrashed
}

// crashNow freezes the file system as if power failed now.
func (fs *memFS) crashNow() map[string][]byte {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if !fs.frozen {
		fs.budget, fs.syncOnly = 1, false
		fs.tickLocked(false)
	}
	return fs.snap
}

func apply(d []byte, op memOp) []byte {
	if op.trunc {
		if op.off <= int64(len(d)) {
			return d[:op.off]
		}
		return append(d, make([]byte, op.off-int64(len(d)))...)
	}
	if end := op.off + int64(len(op.b)); end > int64(len(d)) {
		d = append(d, make([]byte, end-int64(len(d)))...)
	}
	copy(d[op.off:], op.b)
	return d
}

func (fs *memFS) open(path string, flag int, perm os.FileMode) (file, error) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	path = filepath.Clean(path)
	f, ok := fs.files[path]
	switch {
	case ok && flag&os.O_CREATE != 0 && flag&os.O_EXCL != 0:
		return nil, os.ErrExist
	case !ok && flag&os.O_CREATE == 0:
		return nil, os.ErrNotExist
	case !ok:
		if fs.frozen {
			return nil, errCrashed
		}
		f = &memFile{}
		fs.files[path] = f
	}
	return &memHandle{fs: fs, f: f, ro: flag&(os.O_RDWR|os.O_WRONLY) == 0}, nil
}

func (fs *memFS) inDir(dir, name string, flag int, perm os.FileMode, confined bool) (file, error) {
	if confined && !filepath.IsLocal(name) {
		return nil, errEscape
	}
	if !filepath.IsAbs(name) {
		name = filepath.Join(dir, name)
	}
	return fs.open(name, flag, perm)
}

func (fs *memFS) syncDir(string) error { return nil }

func (fs *memFS) remove(path string) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	delete(fs.files, filepath.Clean(path))
	return nil
}

type memHandle struct {
	fs *memFS
	f  *memFile
	ro bool
}

func (h *memHandle) ReadAt(p []byte, off int64) (int, error) {
	h.fs.mu.Lock()
	defer h.fs.mu.Unlock()
	if off >= int64(len(h.f.data)) {
		return 0, io.EOF
	}
	n := copy(p, h.f.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (h *memHandle) WriteAt(p []byte, off int64) (int, error) {
	if h.ro {
		return 0, os.ErrPermission
	}
	h.fs.mu.Lock()
	defer h.fs.mu.Unlock()
	if err := h.fs.tickLocked(false); err != nil {
		return 0, err
	}
	op := memOp{off: off, b: slices.Clone(p)}
	h.f.data = apply(h.f.data, op)
	h.f.pending = append(h.f.pending, op)
	return len(p), nil
}

func (h *memHandle) Truncate(n int64) error {
	h.fs.mu.Lock()
	defer h.fs.mu.Unlock()
	if err := h.fs.tickLocked(false); err != nil {
		return err
	}
	op := memOp{off: n, trunc: true}
	h.f.data = apply(h.f.data, op)
	h.f.pending = append(h.f.pending, op)
	return nil
}

func (h *memHandle) Sync() error {
	h.fs.mu.Lock()
	defer h.fs.mu.Unlock()
	if err := h.fs.tickLocked(true); err != nil {
		return err
	}
	for _, op := range h.f.pending {
		h.f.durable = apply(h.f.durable, op)
	}
	h.f.pending = nil
	return nil
}

func (h *memHandle) Size() (int64, error) {
	h.fs.mu.Lock()
	defer h.fs.mu.Unlock()
	return int64(len(h.f.data)), nil
}

func (h *memHandle) Close() error { return nil }
