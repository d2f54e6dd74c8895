// Package uring does positional file reads and writes through a Linux
// io_uring, many per system call. It speaks the kernel ABI directly over
// golang.org/x/sys/unix (io_uring_setup, mmap of the rings, io_uring_enter)
// and does only what the image formats need: IORING_OP_READ and
// IORING_OP_WRITE on one file, submitted as a batch and waited for as a
// batch.
//
// Caller's duties:
//
//  1. Call Supported once; where io_uring is missing or forbidden
//     (kernel.io_uring_disabled, a container's seccomp profile) it says
//     why, and the caller keeps its pread/pwrite path.
//  2. Get a Ring from a Pool, call Do, Put it back. A Ring serves one Do
//     at a time; a Pool is safe for concurrent use.
//  3. Keep every buffer valid and untouched until Do returns: the kernel
//     reads or fills it meanwhile.
//
// Do returns only once every op has completed: nothing the kernel still
// owns outlives it, so a Ring never holds memory past the call. Short
// transfers, -EAGAIN and -EINTR completions are resubmitted for the rest;
// a read that meets end of file stops there and reports N < len(Buf).
package uring

import (
	"errors"
	"fmt"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// Op is one positional read or write.
type Op struct {
	Write bool
	Buf   []byte
	Off   int64
	// Set by Do: bytes transferred, and the error that stopped the op
	// short (nil with N < len(Buf) for a read that reached end of file).
	N   int
	Err error
}

// Ring is one io_uring. Not safe for concurrent use: a Pool hands each
// Ring to one caller at a time.
type Ring struct {
	fd      int
	q       *queues
	pending []int // ops still to submit (their index in the Do call)
	pinner  runtime.Pinner
	broken  bool // io_uring_enter failed: the ring's state is unknown
}

// ringEntries bounds one submission: a ring batch of 32 requests of 11
// segments joins into at most 352 reads or writes, most into far fewer.
const ringEntries = 128

// New sets up a ring.
func New() (*Ring, error) {
	fd, q, err := setup(ringEntries)
	if err != nil {
		return nil, err
	}
	return &Ring{fd: fd, q: q, pending: make([]int, 0, ringEntries)}, nil
}

// Close releases the ring.
func (r *Ring) Close() error {
	r.q.unmap()
	return unix.Close(r.fd)
}

var (
	probeOnce sync.Once
	probeErr  error
)

// Supported reports whether this process can use io_uring: nil, or why not.
// It sets up one ring and does one read, once per process.
func Supported() error {
	probeOnce.Do(func() {
		r, err := New()
		if err != nil {
			probeErr = err
			return
		}
		defer r.Close()
		// A seccomp filter may allow setup and refuse enter: do a read.
		fd, err := unix.MemfdCreate("blktap-uring-probe", unix.MFD_CLOEXEC)
		if err != nil {
			probeErr = fmt.Errorf("io_uring probe: %w", err)
			return
		}
		defer unix.Close(fd)
		if _, err := unix.Pwrite(fd, []byte{1}, 0); err != nil {
			probeErr = fmt.Errorf("io_uring probe: %w", err)
			return
		}
		ops := []Op{{Buf: make([]byte, 1)}}
		if err := r.Do(fd, ops); err != nil || ops[0].N != 1 || ops[0].Buf[0] != 1 {
			probeErr = fmt.Errorf("io_uring probe read: %w", errors.Join(err, ops[0].Err, errors.New("no data")))
		}
	})
	return probeErr
}
