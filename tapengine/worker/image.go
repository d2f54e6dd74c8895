package worker

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/tapengine/blkif"
	"golang.org/x/sys/unix"
)

// maxChain bounds a backing chain: deeper chains are refused, which also
// ends loops the path check misses (hard links, bind mounts).
const maxChain = 16

func (w *worker) open(req *Request) Reply {
	if w.img != nil {
		return fail(fmt.Errorf("%w: an image is already open", errInvalid))
	}
	if !slices.Contains(IOEngines, req.IO) && req.IO != "" {
		return fail(fmt.Errorf("%w: io %q (want one of %v)", errInvalid, req.IO, IOEngines))
	}
	w.name = req.Name
	w.logger = w.logger.With("disk", req.Name)
	w.uring = w.useURing(req.IO, req.Format)
	img, lock, err := w.openImage(req.Format, req.Path, req.ReadOnly, req.AllowDirs)
	if err != nil {
		return fail(err)
	}
	w.img, w.lock = &gate{img: img}, lock
	w.io = &throttle{Image: w.img}
	w.idleStop = w.startIdleTrim()
	_, noMedium := img.(image.Empty)
	w.readOnly, w.format, w.path, w.size = req.ReadOnly || noMedium, req.Format, req.Path, img.Size()
	w.logger.Info("worker: image open", "format", req.Format, "path", req.Path, "size", img.Size(), "readonly", w.readOnly, "uring", w.uring)
	return Reply{OK: true, Size: img.Size(), SectorSize: blkif.SectorSize}
}

// openImage opens and locks an image; allow confines its backing chain
// (empty: the image's own directory).
func (w *worker) openImage(format, path string, readOnly bool, allow []string) (image.Image, *os.File, error) {
	if format == "" && path == "" {
		// A CD-ROM drive with no disc in it (the daemon asks only for
		// device-type cdrom): no sectors, nothing to lock.
		return image.Empty{}, nil, nil
	}
	isFile := formats.IsFile(format)
	if isFile && !filepath.IsAbs(path) {
		return nil, nil, fmt.Errorf("%w: image path %q is not absolute", errInvalid, path)
	}
	if len(allow) == 0 {
		allow = []string{filepath.Dir(path)}
	}
	// A RAM disk is shared by design and an nbd image lives elsewhere:
	// only image files are locked.
	var lock *os.File
	if isFile {
		var err error
		if lock, err = lockImage(path, readOnly); err != nil {
			return nil, nil, err
		}
	}
	img, err := formats.Open(format, path, formats.Options{
		ReadOnly: readOnly,
		Backing:  BackingOpener(path, allow, 0),
		Logger:   w.logger,
		URing:    w.uring && format == "raw",
	})
	if err != nil {
		if lock != nil {
			lock.Close()
		}
		return nil, nil, err
	}
	return img, lock, nil
}

// pause holds every consumer's I/O after the requests in flight, then
// flushes and closes the image and releases its lock, so another program
// may use the file until resume.
func (w *worker) pause() Reply {
	if w.img == nil {
		return fail(fmt.Errorf("%w: no image open", errInvalid))
	}
	if w.paused {
		return fail(fmt.Errorf("%w: already paused", errInvalid))
	}
	img := w.img.pause()
	w.paused = true
	err := img.Close() // flushes first
	if w.lock != nil {
		w.lock.Close()
		w.lock = nil
	}
	if err != nil {
		// The image is gone either way; resume reopens it.
		w.logger.Error("worker: pause: close", "err", err)
		return fail(err)
	}
	w.logger.Info("worker: paused")
	return Reply{OK: true, Size: w.size}
}

// resume reopens the image, or opens the one the request names (a
// snapshot overlay, say), and releases the held I/O. The new image must
// have the size the consumers know.
func (w *worker) resume(req *Request) Reply {
	if !w.paused {
		return fail(fmt.Errorf("%w: not paused", errInvalid))
	}
	format, path := w.format, w.path
	if req.Path != "" {
		format, path = req.Format, req.Path
	}
	img, lock, err := w.openImage(format, path, w.readOnly, req.AllowDirs)
	if err != nil {
		return fail(err) // still paused: the daemon may try another image
	}
	if img.Size() != w.size {
		img.Close()
		if lock != nil {
			lock.Close()
		}
		return fail(fmt.Errorf("%w: %s is %d bytes, the disk is %d", errInvalid, path, img.Size(), w.size))
	}
	w.lock, w.format, w.path, w.paused = lock, format, path, false
	w.img.resume(img)
	w.logger.Info("worker: resumed", "format", format, "path", path)
	return Reply{OK: true, Size: w.size}
}

// BackingOpener returns the function a format uses to open the backing file
// its image at child names: relative names resolve against the child's
// directory, the result must lie inside one of allow, the chain is
// depth-limited, and every backing image is opened read-only.
func BackingOpener(child string, allow []string, depth int) image.OpenFunc {
	return func(name, format string) (image.Image, error) {
		if depth+1 >= maxChain {
			return nil, fmt.Errorf("%w: backing chain deeper than %d", image.ErrUnsupported, maxChain)
		}
		real, err := ResolveBacking(child, name)
		if err != nil {
			return nil, err
		}
		if !insideAny(real, allow) {
			return nil, fmt.Errorf("%w: backing file %q lies outside the allowed directories %v", fs.ErrPermission, name, allow)
		}
		if format == "" {
			// Probed, never trusted for writing: the opener only opens
			// read-only, so a probe that says "raw" cannot turn a header
			// into guest data that is then written back.
			if format, err = formats.Probe(real); err != nil {
				return nil, fmt.Errorf("backing file %q: %w", name, err)
			}
		}
		return formats.Open(format, real, formats.Options{
			ReadOnly: true,
			Backing:  BackingOpener(real, allow, depth+1),
		})
	}
}

// ErrInUse reports an image another disk holds open for writing (or one
// this disk wants to write that another holds open at all).
var ErrInUse = errors.New("image is in use by another disk")

// lockImage takes a flock on path: exclusive for a writable disk, shared
// for a read-only one, so two disks never write one image and nobody reads
// an image that another disk writes. The lock lives on its own open file
// description and dies with the worker, so a crashed worker never leaves
// an image locked.
func lockImage(path string, readOnly bool) (*os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	how := unix.LOCK_EX
	if readOnly {
		how = unix.LOCK_SH
	}
	for {
		err = unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		if err == unix.EWOULDBLOCK {
			return nil, fmt.Errorf("%w: %s", ErrInUse, path)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return f, nil
}

func insideAny(p string, dirs []string) bool {
	for _, d := range dirs {
		if rd, err := filepath.EvalSymlinks(d); err == nil {
			d = rd
		}
		d = filepath.Clean(d)
		if p == d || strings.HasPrefix(p, d+string(filepath.Separator)) || d == "/" {
			return true
		}
	}
	return false
}
