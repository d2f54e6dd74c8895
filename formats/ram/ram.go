// Package ram is the shareable RAM disk: a sparse, memory-backed disk that
// several devices attach by NAME (several VMs' disks, or dom0 and a VM),
// each seeing the others' writes at once. It is the "ram" format.
//
// Workers are separate processes, so the disk is a file on tmpfs
// (Options.Dir, default /dev/shm) named blktap-ram-NAME: every attached
// worker opens the same file, and the kernel's page cache is the one copy
// of the data they all read and write. The file is sparse: untouched
// pages cost no memory, Discard punches holes that give the memory back,
// and Map reports holes with SEEK_DATA/SEEK_HOLE.
//
//	/dev/shm/blktap-ram-NAME
//	+-------------+---------------------------------------------+
//	| header page | disk bytes 0 .. size-1 (holes where unused) |
//	+-------------+---------------------------------------------+
//	0             4096
//
// Lifetime (a decision, not an accident): the disk is volatile, as the
// 2006 RAM disk was: it is never written to persistent storage and a host
// reboot loses it. It is NOT freed when the last device detaches: a worker
// that crashes and is restarted, a paused disk, or a VM that reboots must
// find its data again, and the daemon cannot tell those from a final
// detach. The memory is freed by Remove, which refuses while any device is
// attached. Every attached Image holds a shared flock on the file: that is
// the reference count, and the kernel drops it when a process dies, so a
// crashed worker never leaves a count that is wrong.
//
// Flush is a successful no-op: the data is as durable as it will ever be
// (in memory, visible to every attached device) once WriteAt returns.
//
// Reads and writes use pread/pwrite, not a shared mapping: a store into a
// mapped tmpfs page when tmpfs is full raises SIGBUS and would kill the
// worker, while pwrite returns ENOSPC, which becomes an I/O error for the
// one request.
//
// An *Image is safe for concurrent use, within a process and across
// processes attached to the same name (writes to one range from two
// devices at once land in either order, as on any shared disk).
//
// Caller's duties:
//
//  1. Pass a name from a trusted source, or check it with ValidateName
//     (Open does too): names become file names.
//  2. Give a size to create a disk; give 0 (or the same size) to attach
//     one that exists. ParseParams reads "NAME?size=1G" params.
//  3. Set Options.MaxBytes to the memory this disk may use; writes that
//     would allocate past it fail with ErrMemoryLimit (which also matches
//     unix.ENOSPC). The check is made by each writer against the file's
//     allocated size, so concurrent writers may overshoot by at most the
//     writes they have in flight.
//  4. Close every Image; call Remove to free the memory once no device
//     needs the data.
//  5. To keep a disk across reboots, Load it from an image file on attach
//     and Save it to one on a clean detach (the caller opens the file with
//     its format package); nothing here touches persistent storage.
//
// The header file is in Options.Dir, often world-writable: Open accepts
// only a regular file owned by the calling user (and creates files mode
// 0600), so another local user cannot plant a disk for a worker to serve.
package ram

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/guard"
)

// Name is the format's canonical name.
const Name = "ram"

// FilePrefix starts the name of every RAM disk file in Options.Dir.
const FilePrefix = "blktap-ram-"

// DefaultDir is where RAM disks live unless Options.Dir says otherwise.
const DefaultDir = "/dev/shm"

var (
	// ErrMemoryLimit: a write would make the disk use more memory than
	// Options.MaxBytes. Errors of this class also match unix.ENOSPC.
	ErrMemoryLimit = errors.New("RAM disk memory limit reached")
	// ErrBusy: Remove of a disk that a device still has attached.
	ErrBusy = errors.New("RAM disk is attached")
	// ErrSizeMismatch: Open with a size other than the existing disk's.
	ErrSizeMismatch = errors.New("RAM disk exists with another size")
)

// Options control Open and Remove.
type Options struct {
	// ReadOnly attaches without write access; writes and discards get
	// image.ErrReadOnly. A read-only Open never creates a disk.
	ReadOnly bool
	// Dir holds the disk files; "" means DefaultDir. It should be on
	// tmpfs: elsewhere the disk still works but is a plain sparse file.
	Dir string
	// MaxBytes bounds the memory the disk's data may use; 0 means half
	// of the host's RAM.
	MaxBytes int64
}

func (o Options) withDefaults() (Options, error) {
	if o.Dir == "" {
		o.Dir = DefaultDir
	}
	if o.MaxBytes < 0 {
		return o, fmt.Errorf("ram: negative MaxBytes %d", o.MaxBytes)
	}
	if o.MaxBytes == 0 {
		var si unix.Sysinfo_t
		if err := unix.Sysinfo(&si); err != nil {
			return o, fmt.Errorf("ram: sysinfo: %w", err)
		}
		o.MaxBytes = int64(si.Totalram) * int64(si.Unit) / 2
	}
	return o, nil
}

// Path returns the file that holds the RAM disk name in dir ("" = DefaultDir).
func Path(dir, name string) string {
	if dir == "" {
		dir = DefaultDir
	}
	return filepath.Join(dir, FilePrefix+name)
}

// Image is one attachment of a RAM disk. It implements image.Image.
type Image struct {
	f        *os.File
	name     string
	path     string
	size     int64
	readOnly bool
	maxBytes int64
	guard    guard.Guard // closed, read-only and range checks
}

var _ image.Image = (*Image)(nil)

// OpenParams opens the disk that params (see ParseParams) describe.
func OpenParams(params string, opts Options) (*Image, error) {
	name, size, err := ParseParams(params)
	if err != nil {
		return nil, err
	}
	return Open(name, size, opts)
}

// Open attaches the RAM disk name, creating it with size bytes if it does
// not exist. size 0 attaches an existing disk whatever its size; any other
// size must match the existing disk's (ErrSizeMismatch).
func Open(name string, size int64, opts Options) (*Image, error) {
	if err := ValidateName(name); err != nil {
		return nil, fmt.Errorf("ram: %w", err)
	}
	if size < 0 || size > MaxSize {
		return nil, fmt.Errorf("ram: %s: size %d outside 0..%d", name, size, int64(MaxSize))
	}
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	path := Path(opts.Dir, name)
	// Each pass either attaches, or loses a race with a concurrent
	// create or Remove and looks again; a handful of passes is plenty
	// unless something keeps recreating the file on purpose.
	for range 16 {
		img, err := attach(name, path, size, opts)
		if err == nil {
			return img, nil
		}
		if !errors.Is(err, errRetry) {
			return nil, err
		}
		if errors.Is(err, fs.ErrNotExist) {
			if size == 0 {
				return nil, fmt.Errorf("ram: %s: %w (give a size to create it)", name, fs.ErrNotExist)
			}
			if opts.ReadOnly {
				return nil, fmt.Errorf("ram: %s: %w (a read-only attach never creates)", name, fs.ErrNotExist)
			}
			if err := create(opts.Dir, path, size); err != nil && !errors.Is(err, fs.ErrExist) {
				return nil, err
			}
		}
	}
	return nil, fmt.Errorf("ram: %s: the file kept changing while attaching; giving up", path)
}

// errRetry marks an attach that lost a race and should be tried again.
var errRetry = errors.New("retry")

func attach(name, path string, size int64, opts Options) (*Image, error) {
	flag := os.O_RDWR
	if opts.ReadOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %w", errRetry, fs.ErrNotExist)
	}
	if err != nil {
		return nil, fmt.Errorf("ram: open: %w", err)
	}
	img := &Image{f: f, name: name, path: path, readOnly: opts.ReadOnly, maxBytes: opts.MaxBytes}
	img.guard.SetLabel("ram: " + name)
	ok := false
	defer func() {
		if !ok {
			f.Close()
		}
	}()
	// A shared lock is this attachment's reference. Remove holds the
	// exclusive lock only while it unlinks, so a short wait suffices;
	// a lock held longer is a stuck or hostile process: say so.
	for i := 0; ; i++ {
		err = img.control(func(fd int) error { return unix.Flock(fd, unix.LOCK_SH|unix.LOCK_NB) })
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EWOULDBLOCK) || i == 50 {
			return nil, fmt.Errorf("ram: %s: flock: %w", path, err)
		}
		time.Sleep(time.Millisecond)
	}
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("ram: %s: stat: %w", path, err)
	}
	sys, _ := st.Sys().(*syscall.Stat_t)
	now, err := os.Lstat(path)
	if err != nil || !os.SameFile(st, now) || sys == nil || sys.Nlink == 0 {
		// Removed (or replaced) between our open and our lock.
		return nil, fmt.Errorf("%w: %s was replaced", errRetry, path)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("ram: %s: %w: not a regular file (mode %v)", path, image.ErrWrongFormat, st.Mode())
	}
	if uid := uint32(os.Geteuid()); sys.Uid != uid {
		return nil, fmt.Errorf("ram: %s: owned by uid %d, not by us (uid %d): refusing a disk someone else made",
			path, sys.Uid, uid)
	}
	buf := make([]byte, HeaderSize)
	n, err := f.ReadAt(buf, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("ram: %s: read header: %w", path, err)
	}
	h, err := parseHeader(buf[:n], st.Size())
	if err != nil {
		return nil, fmt.Errorf("ram: %s: %w", path, err)
	}
	if size != 0 && size != h.size {
		return nil, fmt.Errorf("ram: %s: %w: it has %d bytes, asked for %d", name, ErrSizeMismatch, h.size, size)
	}
	img.size = h.size
	ok = true
	return img, nil
}

// create makes the file for a new disk under a temporary name and then
// publishes it with a rename that refuses to replace, so an attacher never
// sees a file without its header, and of two racing creators one wins and
// the other attaches to the winner's disk (fs.ErrExist).
func create(dir, path string, size int64) (err error) {
	tmp := filepath.Join(dir, ".blktap-ram-new-"+strconv.Itoa(os.Getpid())+"-"+strconv.FormatUint(rand.Uint64(), 36))
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("ram: create: %w", err)
	}
	defer func() {
		f.Close()
		if err != nil {
			os.Remove(tmp)
		}
	}()
	if _, err := f.WriteAt(header{size: size}.encode(), 0); err != nil {
		return fmt.Errorf("ram: create %s: %w", path, err)
	}
	if err := f.Truncate(HeaderSize + size); err != nil {
		return fmt.Errorf("ram: create %s: %w", path, err)
	}
	if err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, path, unix.RENAME_NOREPLACE); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("ram: create %s: %w", path, fs.ErrExist)
		}
		return fmt.Errorf("ram: create %s: rename: %w", path, err)
	}
	return nil
}

// Remove frees the RAM disk name. It fails with ErrBusy while any device
// has it attached, and with an error wrapping fs.ErrNotExist when there is
// no such disk.
func Remove(name string, opts Options) error {
	if err := ValidateName(name); err != nil {
		return fmt.Errorf("ram: %w", err)
	}
	path := Path(opts.Dir, name)
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("ram: remove: %w", err)
	}
	defer f.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("ram: remove %s: %w", path, err)
	}
	var lerr error
	if err := rc.Control(func(fd uintptr) { lerr = unix.Flock(int(fd), unix.LOCK_EX|unix.LOCK_NB) }); err != nil {
		return fmt.Errorf("ram: remove %s: %w", path, err)
	}
	if errors.Is(lerr, unix.EWOULDBLOCK) {
		return fmt.Errorf("ram: remove %s: %w", name, ErrBusy)
	}
	if lerr != nil {
		return fmt.Errorf("ram: remove %s: flock: %w", path, lerr)
	}
	// Holding the exclusive lock, check that the name is still this
	// file before unlinking it: an attacher that opened it meanwhile
	// waits for our lock, then sees the file is gone and looks again.
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("ram: remove %s: %w", path, err)
	}
	now, err := os.Lstat(path)
	if err != nil {
		return fmt.Errorf("ram: remove: %w", err)
	}
	if !os.SameFile(st, now) {
		return fmt.Errorf("ram: remove %s: %w: replaced while removing; try again", name, ErrBusy)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("ram: remove: %w", err)
	}
	return nil
}

// control runs fn on the descriptor while the os.File keeps it open.
func (img *Image) control(fn func(fd int) error) error {
	rc, err := img.f.SyscallConn()
	if err != nil {
		return img.ioErr("syscall conn", err)
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return img.ioErr("control", err)
	}
	return ferr
}

func (img *Image) ioErr(op string, err error) error {
	if errors.Is(err, os.ErrClosed) {
		return fmt.Errorf("ram: %s: %s: %w: %w", img.name, op, image.ErrClosed, err)
	}
	return fmt.Errorf("ram: %s: %s: %w", img.name, op, err)
}

// Name returns the disk's name.
func (img *Image) Name() string { return img.name }

// Path returns the file that holds the disk.
func (img *Image) Path() string { return img.path }

// Size returns the virtual size in bytes.
func (img *Image) Size() int64 { return img.size }

// ReadOnly reports whether this attachment is read-only.
func (img *Image) ReadOnly() bool { return img.readOnly }

// ReadAt reads len(p) bytes at off; holes read as zeros.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if err := img.guard.Span(off, int64(len(p)), img.size); err != nil {
		return 0, err
	}
	n, err := img.f.ReadAt(p, HeaderSize+off)
	if n == len(p) {
		return n, nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		// Only a foreign truncate can shorten the file under us.
		return n, fmt.Errorf("ram: %s: read %d of %d bytes at %d (file truncated behind our back): %w",
			img.name, n, len(p), off, io.ErrUnexpectedEOF)
	}
	return n, img.ioErr("read", err)
}

// WriteAt writes p at off. The data is visible to every attached device
// when it returns.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if err := img.guard.Change("write", img.readOnly, off, int64(len(p)), img.size); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	if err := img.reserve(off, int64(len(p))); err != nil {
		return 0, err
	}
	n, err := img.f.WriteAt(p, HeaderSize+off)
	if err != nil {
		if errors.Is(err, unix.ENOSPC) {
			return n, fmt.Errorf("ram: %s: write: tmpfs %s is full (its size= mount option, not MaxBytes): %w",
				img.name, filepath.Dir(img.path), err)
		}
		return n, img.ioErr("write", err)
	}
	return n, nil
}

// reserve fails with ErrMemoryLimit when writing [off, off+n) would take
// the disk's memory past maxBytes. The common case (far below the limit)
// costs one fstat; only near the limit are the range's holes counted, so
// that rewriting allocated data never fails.
func (img *Image) reserve(off, n int64) error {
	var st unix.Stat_t
	if err := img.control(func(fd int) error { return unix.Fstat(fd, &st) }); err != nil {
		return img.ioErr("fstat", err)
	}
	used := max(st.Blocks*512-HeaderSize, 0)
	if used+n <= img.maxBytes {
		return nil
	}
	need := int64(0)
	ps := int64(os.Getpagesize())
	err := img.walk(off&^(ps-1), min((off+n+ps-1)&^(ps-1), img.size), func(e image.Extent) {
		if e.Kind == image.Hole {
			need += e.Length
		}
	})
	if err != nil {
		return err
	}
	if need > 0 && used+need > img.maxBytes {
		return fmt.Errorf("ram: %s: write of %d bytes at %d: %w: %w (uses %d bytes, limit %d; discard data or raise the limit)",
			img.name, n, off, ErrMemoryLimit, unix.ENOSPC, used, img.maxBytes)
	}
	return nil
}

// Flush succeeds at once: a RAM disk is volatile by design, and every
// completed write is already visible to all attached devices.
func (img *Image) Flush() error { return img.guard.Open() }

// Discard punches a hole: the range reads as zeros and whole pages in it
// return their memory.
func (img *Image) Discard(off, length int64) error {
	if err := img.guard.Change("discard", img.readOnly, off, length, img.size); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	err := img.control(func(fd int) error {
		return unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, HeaderSize+off, length)
	})
	if errors.Is(err, unix.EOPNOTSUPP) {
		return fmt.Errorf("ram: %s: discard: %w: %w", img.name, image.ErrUnsupported, err)
	}
	if err != nil {
		return img.ioErr("discard", err)
	}
	return nil
}

// Map describes [off, off+length) as Data and Hole extents.
func (img *Image) Map(off, length int64) ([]image.Extent, error) {
	if err := img.guard.Span(off, length, img.size); err != nil {
		return nil, err
	}
	var out []image.Extent
	err := img.walk(off, off+length, func(e image.Extent) { out = image.AppendExtent(out, e) })
	if err != nil {
		return nil, err
	}
	return out, nil
}

// walk calls fn for the Data and Hole runs of disk range [start, end), in
// order, using SEEK_DATA/SEEK_HOLE on the file (offsets shifted past the
// header page).
func (img *Image) walk(start, end int64, fn func(image.Extent)) error {
	emit := func(a, b int64, k image.ExtentKind) {
		if b > a {
			fn(image.Extent{Offset: a, Length: b - a, Kind: k})
		}
	}
	err := img.control(func(fd int) error {
		// Only lseek's return values are used, never the shared file
		// offset itself, so concurrent walks do not interfere.
		stalls := 0
		for pos := start; pos < end; {
			data, err := unix.Seek(fd, HeaderSize+pos, unix.SEEK_DATA)
			if errors.Is(err, unix.ENXIO) {
				emit(pos, end, image.Hole)
				return nil
			}
			if err != nil {
				return err
			}
			data -= HeaderSize
			emit(pos, min(data, end), image.Hole)
			if data >= end {
				return nil
			}
			hole, err := unix.Seek(fd, HeaderSize+data, unix.SEEK_HOLE)
			if err != nil {
				return err
			}
			hole -= HeaderSize
			if hole <= data {
				// A concurrent discard made data a hole between the
				// two seeks; look again, but never loop forever.
				if stalls++; stalls < 64 {
					pos = data
					continue
				}
				emit(data, end, image.Data)
				return nil
			}
			emit(max(data, pos), min(hole, end), image.Data)
			pos = hole
		}
		return nil
	})
	if err != nil {
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
			// A Dir whose file system cannot answer: data is safe.
			emit(start, end, image.Data)
			return nil
		}
		return img.ioErr("map", err)
	}
	return nil
}

// Close detaches: the disk and its data stay until Remove. A second Close
// returns image.ErrClosed.
func (img *Image) Close() error {
	if img.guard.Close() {
		return fmt.Errorf("ram: %s: %w", img.name, image.ErrClosed)
	}
	// Closing the descriptor drops our flock: our reference is gone.
	if err := img.f.Close(); err != nil {
		return fmt.Errorf("ram: %s: close: %w", img.name, err)
	}
	return nil
}
