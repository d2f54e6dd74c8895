//go:build rbd

package rbd

/*
#cgo LDFLAGS: -lrbd
#include <stdint.h>
#include <unistd.h>
#include <rbd/librbd.h>

// blktap_aio_fd is the write end of the pipe that carries finished
// completions to Go (aioReap). A completion's callback runs on a librbd
// thread, where Go may not run; eight bytes to a pipe are one atomic
// write, and a full pipe only makes that thread wait for the reaper.
static int blktap_aio_fd = -1;

static void blktap_aio_set_fd(int fd) { blktap_aio_fd = fd; }

static void blktap_aio_done(rbd_completion_t c, void *arg) {
	uint64_t msg = (uint64_t)(uintptr_t)c;
	ssize_t n;
	do {
		n = write(blktap_aio_fd, &msg, sizeof msg);
	} while (n < 0);
}

static int blktap_aio_start(rbd_image_t img, int write, uint64_t off, size_t len, char *buf, uint64_t id, rbd_completion_t *c) {
	int r = rbd_aio_create_completion((void *)(uintptr_t)id, blktap_aio_done, c);
	if (r < 0)
		return r;
	r = write ? rbd_aio_write(img, off, len, buf, *c) : rbd_aio_read(img, off, len, buf, *c);
	if (r < 0)
		rbd_aio_release(*c);
	return r;
}

static uint64_t blktap_aio_finish(uint64_t comp, int64_t *ret) {
	rbd_completion_t c = (rbd_completion_t)(uintptr_t)comp;
	uint64_t id = (uint64_t)(uintptr_t)rbd_aio_get_arg(c);
	*ret = rbd_aio_get_return_value(c);
	rbd_aio_release(c);
	return id;
}
*/
import "C"

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"reflect"
	"runtime"
	"slices"
	"sync"
	"syscall"
	"unsafe"

	librbd "github.com/ceph/go-ceph/rbd"

	"github.com/blktap-go/blktap/formats/image"
)

// Reads and writes go to librbd's aio calls, so a request in flight costs
// a parked goroutine, not an OS thread blocked in a synchronous cgo call,
// and any number may be in flight at once (issue 19). Completions come
// back through one pipe for the process, read by one goroutine (aioReap)
// that wakes each waiting caller. The caller's buffer is pinned
// (runtime.Pinner) until librbd is done with it.

type aioOp struct {
	done chan struct{}
	ret  int64

	// A started call (StartRead, StartWrite) completes to c instead of
	// done; it holds im's read lock, and p pinned, until then.
	im     *Image
	c      image.Completer
	cookie uint64
	p      []byte
	off    int64
	write  bool
	pin    runtime.Pinner
}

var aio struct {
	once sync.Once
	err  error // the pipe could not be made: synchronous I/O only
	mu   sync.Mutex
	ops  map[uint64]*aioOp
	next uint64
}

var aioOpPool = sync.Pool{New: func() any { return &aioOp{done: make(chan struct{}, 1)} }}

func aioInit() error {
	aio.once.Do(func() {
		var fds [2]int
		if err := syscall.Pipe2(fds[:], syscall.O_CLOEXEC); err != nil {
			aio.err = err
			return
		}
		// The read end goes to Go's poller; the write end stays blocking
		// for the C callback.
		if err := syscall.SetNonblock(fds[0], true); err != nil {
			aio.err = err
			return
		}
		aio.ops = map[uint64]*aioOp{}
		C.blktap_aio_set_fd(C.int(fds[1]))
		go aioReap(os.NewFile(uintptr(fds[0]), "rbd-aio"))
	})
	return aio.err
}

// aioReap hands each finished completion's result to its caller: a
// waiting aioIO, or a started call's Completer, which then gets one
// CompleteBatch per pipe read that completed any of its calls.
func aioReap(r *os.File) {
	buf := make([]byte, 8*512)
	have := 0
	var sinks []image.Completer
	var answered []*Image
	for {
		n, err := r.Read(buf[have:])
		if err != nil {
			panic(fmt.Sprintf("rbd aio completion pipe: %v", err)) // callers would wait forever
		}
		have += n
		whole := have - have%8
		for i := 0; i < whole; i += 8 {
			var ret C.int64_t
			id := uint64(C.blktap_aio_finish(C.uint64_t(binary.NativeEndian.Uint64(buf[i:])), &ret))
			aio.mu.Lock()
			op := aio.ops[id]
			delete(aio.ops, id)
			aio.mu.Unlock()
			if op.c == nil {
				op.ret = int64(ret)
				op.done <- struct{}{}
				continue
			}
			if !slices.Contains(sinks, op.c) {
				sinks = append(sinks, op.c)
			}
			answered = append(answered, op.finish(int64(ret)))
		}
		for _, c := range sinks {
			c.CompleteBatch()
		}
		for _, im := range answered {
			im.answering.Done()
		}
		clear(sinks)
		sinks = sinks[:0]
		clear(answered)
		answered = answered[:0]
		have = copy(buf, buf[whole:have])
	}
}

// finish completes a started call with librbd's result ret, recycles op,
// and returns the call's image, whose answering the caller marks done
// after the batch's CompleteBatch.
func (op *aioOp) finish(ret int64) *Image {
	im, c, cookie, p, off, write := op.im, op.c, op.cookie, op.p, op.off, op.write
	op.pin.Unpin()
	op.im, op.c, op.p = nil, nil, nil
	aioOpPool.Put(op)
	im.mu.RUnlock()
	var err error
	switch {
	case write && ret < 0:
		err = fmt.Errorf("rbd write %s at %d: %w", im.spec.Name(), off, describeErrno(int(-ret)))
	case write:
		// librbd reports a finished write as 0 or as its length.
	case ret < 0:
		err = fmt.Errorf("rbd read %s at %d: %w", im.spec.Name(), off, syscall.Errno(-ret))
	case ret != int64(len(p)):
		err = fmt.Errorf("rbd read %s at %d: short read: %d of %d bytes", im.spec.Name(), off, ret, len(p))
	}
	var data []byte
	if !write && err == nil {
		data = p
	}
	c.Complete(cookie, data, err)
	return im
}

// rawImage is go-ceph's rbd_image_t, which v0.30 keeps unexported. If a
// later go-ceph moves it, ok is false and I/O stays synchronous.
func rawImage(img *librbd.Image) (h C.rbd_image_t, ok bool) {
	f := reflect.ValueOf(img).Elem().FieldByName("image")
	if !f.IsValid() || f.Kind() != reflect.Pointer && f.Kind() != reflect.UnsafePointer || f.Type().Size() != unsafe.Sizeof(h) {
		return nil, false
	}
	return *(*C.rbd_image_t)(unsafe.Pointer(f.UnsafeAddr())), true
}

// aioIO reads (or writes) p at off through librbd's aio and waits for it.
// It returns librbd's result: bytes done, or a negative errno.
func aioIO(h C.rbd_image_t, write bool, p []byte, off int64) int64 {
	op := aioOpPool.Get().(*aioOp)
	var pin runtime.Pinner
	pin.Pin(&p[0])
	defer pin.Unpin()
	if r := aioSubmit(h, op, write, p, off); r < 0 {
		aioOpPool.Put(op)
		return r
	}
	<-op.done
	ret := op.ret
	aioOpPool.Put(op)
	return ret
}

// aioSubmit registers op and starts its librbd call on p, which the
// caller has pinned. A negative errno says nothing was started (op is
// unregistered again).
func aioSubmit(h C.rbd_image_t, op *aioOp, write bool, p []byte, off int64) int64 {
	aio.mu.Lock()
	aio.next++
	id := aio.next
	aio.ops[id] = op
	aio.mu.Unlock()
	var comp C.rbd_completion_t
	w := C.int(0)
	if write {
		w = 1
	}
	if r := C.blktap_aio_start(h, w, C.uint64_t(off), C.size_t(len(p)), (*C.char)(unsafe.Pointer(&p[0])), C.uint64_t(id), &comp); r < 0 {
		aio.mu.Lock()
		delete(aio.ops, id)
		aio.mu.Unlock()
		return int64(r)
	}
	return 0
}

var _ image.Starter = (*Image)(nil)

// Starts reports whether StartRead and StartWrite work: the image's I/O
// goes through aio.
func (im *Image) Starts() bool { return im.aio }

// StartRead starts reading len(p) bytes at off into p (image.Starter).
func (im *Image) StartRead(p []byte, off int64, c image.Completer, cookie uint64) error {
	return im.start(false, p, off, c, cookie)
}

// StartWrite starts writing p at off (image.Starter); it completes once
// the OSDs acknowledged it.
func (im *Image) StartWrite(p []byte, off int64, c image.Completer, cookie uint64) error {
	return im.start(true, p, off, c, cookie)
}

// start starts a call that completes to c. It keeps the image's read
// lock until librbd finishes it, so that Close waits for it as for a
// ReadAt, and Close then waits for its answer through answering.
func (im *Image) start(write bool, p []byte, off int64, c image.Completer, cookie uint64) error {
	if !im.aio {
		return fmt.Errorf("rbd %s: starting a call without aio: %w", im.spec.Name(), errors.ErrUnsupported)
	}
	if len(p) == 0 {
		return fmt.Errorf("rbd %s: starting a call of no bytes", im.spec.Name())
	}
	if err := im.enter(); err != nil {
		return err
	}
	var err error
	switch {
	case write && im.readOnly:
		err = image.ErrReadOnly
	default:
		err = image.CheckRange(off, len(p), im.size)
	}
	if err != nil {
		im.mu.RUnlock()
		return err
	}
	op := aioOpPool.Get().(*aioOp)
	op.im, op.c, op.cookie, op.p, op.off, op.write = im, c, cookie, p, off, write
	op.pin.Pin(&p[0])
	im.answering.Add(1) // under the read lock: before Close can Wait
	if r := aioSubmit(im.raw, op, write, p, off); r < 0 {
		im.answering.Done()
		op.pin.Unpin()
		op.im, op.c, op.p = nil, nil, nil
		aioOpPool.Put(op)
		im.mu.RUnlock()
		what := "read"
		if write {
			what = "write"
		}
		return fmt.Errorf("rbd %s %s at %d: %w", what, im.spec.Name(), off, describeErrno(int(-r)))
	}
	return nil
}

// readAt and writeAt are ReadAt's and WriteAt's librbd calls: aio when
// the handle is reachable, go-ceph's synchronous calls otherwise.
func (im *Image) readAt(p []byte, off int64) (int, error) {
	if !im.aio || len(p) == 0 {
		return im.img.ReadAt(p, off)
	}
	r := aioIO(im.raw, false, p, off)
	if r < 0 {
		return 0, syscall.Errno(-r)
	}
	return int(r), nil
}

func (im *Image) writeAt(p []byte, off int64) (int, error) {
	if !im.aio || len(p) == 0 {
		n, err := im.img.WriteAt(p, off)
		if err != nil && n < 0 {
			return 0, describeErrno(-n)
		}
		return n, err
	}
	r := aioIO(im.raw, true, p, off)
	if r < 0 {
		return 0, describeErrno(int(-r))
	}
	// librbd reports a finished write as 0 or as its length.
	return len(p), nil
}

// setupAIO decides, once at Open, whether this image's I/O goes through aio.
func (im *Image) setupAIO() {
	if os.Getenv("BLKTAP_RBD_SYNC") != "" { // a switch for comparing the two
		return
	}
	h, ok := rawImage(im.img)
	if !ok || h == nil || aioInit() != nil {
		return
	}
	im.raw, im.aio = h, true
}
