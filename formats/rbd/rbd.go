//go:build rbd

package rbd

// #include <rbd/librbd.h>
import "C"

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"

	"github.com/ceph/go-ceph/rados"
	librbd "github.com/ceph/go-ceph/rbd"

	"github.com/blktap-go/blktap/formats/image"
)

// Built reports whether this binary has the rbd format.
const Built = true

// Options control Open.
type Options struct {
	ReadOnly bool
	Logger   *slog.Logger
}

// holderKey is the image metadata key where the lock holder writes who it
// is, so a refused opener can name a host, not only a client number.
const holderKey = "blktap.lock-holder"

// Image is one open RBD image.
type Image struct {
	spec     Spec
	conn     *rados.Conn
	ioctx    *rados.IOContext
	img      *librbd.Image
	size     int64
	readOnly bool
	raw      C.rbd_image_t // img's librbd handle, for aio (aio.go)
	aio      bool

	mu     sync.RWMutex // guards closed against calls racing Close
	closed bool
	// answering counts started calls whose Complete, or their batch's
	// CompleteBatch, has not returned yet. Close waits for it.
	answering sync.WaitGroup
}

// ignoreSIGPIPE: librados writes to its OSD and monitor sockets from its
// own threads without MSG_NOSIGNAL. When a peer closes one (an OSD that
// restarts, or the cluster fencing us), the default SIGPIPE would kill the
// whole worker; Ceph's own programs ignore it too, and get EPIPE instead.
var ignoreSIGPIPE sync.Once

// connect opens a cluster connection for spec with the settings every
// Image needs (see the package doc).
func connect(spec Spec) (*rados.Conn, *rados.IOContext, error) {
	ignoreSIGPIPE.Do(func() { signal.Ignore(syscall.SIGPIPE) })
	id := spec.ID
	if id == "" {
		id = "admin"
	}
	conn, err := rados.NewConnWithUser(id)
	if err != nil {
		return nil, nil, fmt.Errorf("rados: %w", err)
	}
	if spec.Conf != "" {
		err = conn.ReadConfigFile(spec.Conf)
	} else {
		err = conn.ReadDefaultConfigFile()
	}
	if err != nil {
		conn.Shutdown()
		return nil, nil, fmt.Errorf("read ceph config %q: %w", confName(spec), err)
	}
	settings := [][2]string{
		// Acknowledge writes only once the OSDs have them (package doc, 2).
		{"rbd_cache", "false"},
		// A discarded range must read as zeros, even part of an object.
		{"rbd_skip_partial_discard", "false"},
		// A cluster that is down fails the open in seconds, not minutes.
		{"client_mount_timeout", "15"},
		// A request to an OSD that stopped answering fails (the guest gets
		// EIO) after this long instead of hanging forever; the image stays
		// open, and I/O resumes when the cluster comes back.
		{"rados_osd_op_timeout", opTimeout(spec)},
	}
	if spec.Keyring != "" {
		settings = append(settings, [2]string{"keyring", spec.Keyring})
	}
	if spec.MonHost != "" {
		settings = append(settings, [2]string{"mon_host", spec.MonHost})
	}
	for _, kv := range settings {
		if err := conn.SetConfigOption(kv[0], kv[1]); err != nil {
			conn.Shutdown()
			return nil, nil, fmt.Errorf("ceph option %s=%s: %w", kv[0], kv[1], err)
		}
	}
	if err := conn.Connect(); err != nil {
		conn.Shutdown()
		return nil, nil, fmt.Errorf("connect to the ceph cluster (%s, client.%s): %w%s", confName(spec), id, err, connectHint(err))
	}
	ioctx, err := conn.OpenIOContext(spec.Pool)
	if err != nil {
		conn.Shutdown()
		return nil, nil, fmt.Errorf("open pool %q: %w", spec.Pool, err)
	}
	ioctx.SetNamespace(spec.Namespace)
	return conn, ioctx, nil
}

// DefaultOpTimeout is rados_osd_op_timeout, in seconds, when the image
// name does not set it.
const DefaultOpTimeout = "60"

func opTimeout(spec Spec) string {
	if spec.OpTimeout != "" {
		return spec.OpTimeout
	}
	return DefaultOpTimeout
}

func poolName(spec Spec) string {
	if spec.Namespace != "" {
		return spec.Pool + "/" + spec.Namespace
	}
	return spec.Pool
}

// connectHint says what a failed connection most often means.
func connectHint(err error) string {
	var coded interface{ ErrorCode() int }
	if !errors.As(err, &coded) {
		return ""
	}
	code := coded.ErrorCode()
	if code < 0 {
		code = -code
	}
	switch syscall.Errno(code) {
	case syscall.EIO, syscall.EACCES, syscall.EPERM:
		return " (the monitors refused us: check id= and keyring=)"
	case syscall.ETIMEDOUT:
		return " (no monitor answered in 15 s: check mon_host= or the conf file's mon host, and that the cluster is up)"
	}
	return ""
}

func confName(spec Spec) string {
	if spec.Conf != "" {
		return spec.Conf
	}
	return "the default ceph.conf"
}

// Open opens the image that name (ParseSpec's form) names.
func Open(name string, opts Options) (image.Image, error) {
	spec, err := ParseSpec(name)
	if err != nil {
		return nil, err
	}
	readOnly := opts.ReadOnly || spec.Snap != ""
	conn, ioctx, err := connect(spec)
	if err != nil {
		return nil, fmt.Errorf("open rbd:%s: %w", spec.Name(), err)
	}
	var img *librbd.Image
	if readOnly {
		img, err = librbd.OpenImageReadOnly(ioctx, spec.Image, snapArg(spec))
	} else {
		img, err = librbd.OpenImage(ioctx, spec.Image, librbd.NoSnapshot)
	}
	if err != nil {
		ioctx.Destroy()
		conn.Shutdown()
		if errors.Is(err, librbd.ErrNotFound) {
			return nil, fmt.Errorf("open rbd:%s: no image %q in pool %q: %w", spec.Name(), spec.Image, poolName(spec), os.ErrNotExist)
		}
		return nil, fmt.Errorf("open rbd:%s: %w", spec.Name(), err)
	}
	im := &Image{spec: spec, conn: conn, ioctx: ioctx, img: img, readOnly: readOnly}
	if err := im.init(); err != nil {
		im.release()
		return nil, fmt.Errorf("open rbd:%s: %w", spec.Name(), err)
	}
	return im, nil
}

func snapArg(spec Spec) string {
	if spec.Snap == "" {
		return librbd.NoSnapshot
	}
	return spec.Snap
}

// init takes the size and, for a writable image, the exclusive lock.
func (im *Image) init() error {
	size, err := im.img.GetSize()
	if err != nil {
		return fmt.Errorf("size: %w", err)
	}
	if size > 1<<62 {
		return fmt.Errorf("%w: size %d", image.ErrUnsupported, size)
	}
	im.size = int64(size)
	im.setupAIO()
	if im.readOnly {
		return nil
	}
	return im.lock()
}

// release closes what Open opened, in reverse order.
func (im *Image) release() {
	if im.img != nil {
		im.img.Close()
	}
	im.ioctx.Destroy()
	im.conn.Shutdown()
}

func (im *Image) enter() error {
	im.mu.RLock()
	if im.closed {
		im.mu.RUnlock()
		return image.ErrClosed
	}
	return nil
}

// Size is the virtual size in bytes, as it was at Open.
func (im *Image) Size() int64 { return im.size }

// Spec is the image's name.
func (im *Image) Spec() Spec { return im.spec }

// ReadAt reads len(p) bytes at off. librbd is thread-safe: concurrent
// calls are concurrent requests to the OSDs.
func (im *Image) ReadAt(p []byte, off int64) (int, error) {
	if err := im.enter(); err != nil {
		return 0, err
	}
	defer im.mu.RUnlock()
	if err := image.CheckRange(off, len(p), im.size); err != nil {
		return 0, err
	}
	n, err := im.readAt(p, off)
	if n == len(p) {
		return n, nil
	}
	if err == nil {
		err = fmt.Errorf("short read: %d of %d bytes", n, len(p))
	}
	return n, fmt.Errorf("rbd read %s at %d: %w", im.spec.Name(), off, err)
}

// WriteAt writes p at off; it returns once the OSDs acknowledged it.
func (im *Image) WriteAt(p []byte, off int64) (int, error) {
	if err := im.enter(); err != nil {
		return 0, err
	}
	defer im.mu.RUnlock()
	if im.readOnly {
		return 0, image.ErrReadOnly
	}
	if err := image.CheckRange(off, len(p), im.size); err != nil {
		return 0, err
	}
	n, err := im.writeAt(p, off)
	if err != nil || n != len(p) {
		if n <= 0 && err != nil {
			return 0, fmt.Errorf("rbd write %s at %d: %w", im.spec.Name(), off, err)
		}
		return 0, fmt.Errorf("rbd write %s at %d: wrote %d of %d bytes: %v", im.spec.Name(), off, n, len(p), err)
	}
	return n, nil
}

// Flush makes every completed write durable. With librbd's cache off
// they already are; the call also orders us behind any in-flight write.
func (im *Image) Flush() error {
	if err := im.enter(); err != nil {
		return err
	}
	defer im.mu.RUnlock()
	if im.readOnly {
		return nil
	}
	if err := im.img.Flush(); err != nil {
		return fmt.Errorf("rbd flush %s: %w", im.spec.Name(), err)
	}
	return nil
}

// Discard deallocates a range; it reads as zeros afterwards.
func (im *Image) Discard(off, length int64) error {
	return im.zeroRange("discard", off, length, func(o, n uint64) error {
		_, err := im.img.Discard(o, n)
		return err
	})
}

// zeroChunk is what WriteZeroes hands librbd's writesame per call: one
// sector of pattern, repeated.
var zeroChunk = make([]byte, 512)

// WriteZeroes makes a range read as zeros. With mayTrim it deallocates
// (Discard); without it, writesame of a zero sector, which librbd may
// still turn into a deallocation (rbd_discard_on_zeroed_write_same),
// reading the same either way.
func (im *Image) WriteZeroes(off, length int64, mayTrim bool) error {
	if mayTrim || off%512 != 0 || length%512 != 0 {
		return im.Discard(off, length)
	}
	return im.zeroRange("write zeroes", off, length, func(o, n uint64) error {
		_, err := im.img.WriteSame(o, n, zeroChunk, 0)
		return err
	})
}

// zeroRange checks a zeroing request and hands it to op in pieces of at
// most 1 GiB: librbd returns the length done as an int.
func (im *Image) zeroRange(what string, off, length int64, op func(off, n uint64) error) error {
	if err := im.enter(); err != nil {
		return err
	}
	defer im.mu.RUnlock()
	if im.readOnly {
		return image.ErrReadOnly
	}
	if err := image.CheckRange64(off, length, im.size); err != nil {
		return err
	}
	for length > 0 {
		n := min(length, 1<<30)
		if err := op(uint64(off), uint64(n)); err != nil {
			return fmt.Errorf("rbd %s %s at %d: %w", what, im.spec.Name(), off, err)
		}
		off, length = off+n, length-n
	}
	return nil
}

// Map reports the allocated runs of [off, off+length) as data and the
// rest as holes, from librbd's diff of the image (parent included)
// against nothing. It asks the object map where the image has one
// (fast-diff), and lists objects where it has not.
func (im *Image) Map(off, length int64) ([]image.Extent, error) {
	if err := im.enter(); err != nil {
		return nil, err
	}
	defer im.mu.RUnlock()
	if err := image.CheckRange64(off, length, im.size); err != nil {
		return nil, err
	}
	if length == 0 {
		return nil, nil
	}
	var data []image.Extent
	// Whole objects: with fast-diff librbd answers from the object map,
	// which the lock holder keeps in memory. Exact extents would cost a
	// list-snaps round trip to an OSD per object, and the NBD export asks
	// before every read of 64K or more (a sparse read): measured, a 1M
	// read then took two OSD operations instead of one.
	err := im.img.DiffIterate(librbd.DiffIterateConfig{
		Offset:        uint64(off),
		Length:        uint64(length),
		IncludeParent: librbd.IncludeParent,
		WholeObject:   librbd.EnableWholeObject,
		Callback: func(o, l uint64, exists int, _ interface{}) int {
			if exists != 0 {
				data = append(data, image.Extent{Offset: int64(o), Length: int64(l), Kind: image.Data})
			}
			return 0
		},
	})
	if err != nil {
		return nil, fmt.Errorf("rbd map %s: %w", im.spec.Name(), err)
	}
	return fillHoles(data, off, length), nil
}

// Close releases the exclusive lock (after librbd flushed) and the
// cluster connection.
func (im *Image) Close() error {
	err := im.close()
	// A started call lets go of the lock before it is answered, so that
	// its Completer may start another (refused now): wait for the answers
	// outside the lock.
	im.answering.Wait()
	return err
}

func (im *Image) close() error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed {
		return image.ErrClosed
	}
	im.closed = true
	var errs []error
	if !im.readOnly {
		if err := im.img.Flush(); err != nil {
			errs = append(errs, fmt.Errorf("flush: %w", err))
		}
		if err := im.img.LockRelease(); err != nil {
			errs = append(errs, fmt.Errorf("release the exclusive lock: %w", err))
		}
	}
	if err := im.img.Close(); err != nil {
		errs = append(errs, err)
	}
	im.img = nil
	im.release()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close rbd:%s: %w", im.spec.Name(), err)
	}
	return nil
}

// describeHolder names the holder of the image's lock for an error:
// librbd's owner string, and what the holder wrote of itself.
func (im *Image) describeHolder() string {
	owners, err := im.img.LockGetOwners()
	var names []string
	for _, o := range owners {
		names = append(names, o.Owner)
	}
	who := strings.Join(names, ", ")
	if err != nil || who == "" {
		who = "another client"
	}
	// The holder's own record, if it is the current owner's (an old
	// record may name an earlier holder).
	if rec, err := im.img.GetMetadata(holderKey); err == nil && len(owners) == 1 {
		if h, ok := parseHolder(rec); ok && h.client == owners[0].Owner {
			who += fmt.Sprintf(" (blktap on host %s, pid %d)", h.host, h.pid)
		}
	}
	return who
}

// describeErrno says what librbd's errno means for a disk; ESHUTDOWN is
// the cluster fencing this client, which a user must be told plainly.
func describeErrno(errno int) error {
	e := syscall.Errno(errno)
	if e == syscall.ESHUTDOWN {
		return fmt.Errorf("%w: the cluster blocklisted this client (another host broke its exclusive lock while it did not answer); the disk must be reopened", e)
	}
	return e
}
