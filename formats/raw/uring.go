package raw

import (
	"fmt"
	"io"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/uring"
)

// URingSupported reports whether io_uring works in this process (nil), or
// why not: missing, disabled by kernel.io_uring_disabled, or refused by a
// seccomp profile. Open with Options.URing where it is not quietly uses
// pread/pwrite.
func URingSupported() error { return uring.Supported() }

// maxRings bounds one image's io_uring instances: one per caller in
// flight at once (a ring queue's loop, an NBD worker). Callers past it use
// pread/pwrite, so none ever waits for a ring.
const maxRings = 8

var _ image.Batcher = (*Image)(nil)

// Batch does every op through one io_uring submission where the image
// was opened with Options.URing (else one pread/pwrite each). Each op gets
// the error ReadAt or WriteAt would give it.
func (img *Image) Batch(ops []image.BatchOp) {
	var r *uring.Ring
	if img.rings != nil {
		r = img.rings.Get()
	}
	if r == nil {
		for i := range ops {
			ops[i].Err = img.one(ops[i].Write, ops[i].Buf, ops[i].Off)
		}
		return
	}
	defer img.rings.Put(r)
	uops := make([]uring.Op, 0, len(ops))
	idx := make([]int, 0, len(ops)) // uops[k] is ops[idx[k]]
	for i := range ops {
		op := &ops[i]
		if op.Err = img.check(op.Write, op.Buf, op.Off); op.Err == nil {
			uops = append(uops, uring.Op{Write: op.Write, Buf: op.Buf, Off: op.Off})
			idx = append(idx, i)
		}
	}
	img.doRing(r, uops)
	for k, u := range uops {
		ops[idx[k]].Err = img.result(u.Write, u.Buf, u.Off, u.N, u.Err)
	}
}

func (img *Image) one(write bool, p []byte, off int64) error {
	var err error
	if write {
		_, err = img.WriteAt(p, off)
	} else {
		_, err = img.ReadAt(p, off)
	}
	return err
}

func (img *Image) check(write bool, p []byte, off int64) error {
	if write {
		return img.guard.Change("write", img.readOnly, off, int64(len(p)), img.size)
	}
	return img.guard.Span(off, int64(len(p)), img.size)
}

// doRing runs ops on r while the file stays open, so a concurrent Close
// cannot hand the descriptor number to another file mid-batch.
func (img *Image) doRing(r *uring.Ring, ops []uring.Op) {
	err := img.control(func(fd int) error { return r.Do(fd, ops) })
	if err == nil {
		return
	}
	for i := range ops {
		if ops[i].Err == nil && ops[i].N < len(ops[i].Buf) {
			ops[i].Err = err
		}
	}
}

// ioURing is ReadAt or WriteAt through a ring, for an image opened with
// Options.URing; ok is false when no ring is free (the caller then does
// pread/pwrite).
func (img *Image) ioURing(write bool, p []byte, off int64) (n int, ok bool, err error) {
	r := img.rings.Get()
	if r == nil {
		return 0, false, nil
	}
	defer img.rings.Put(r)
	ops := [1]uring.Op{{Write: write, Buf: p, Off: off}}
	img.doRing(r, ops[:])
	return ops[0].N, true, img.result(write, p, off, ops[0].N, ops[0].Err)
}

// result turns a ring op's outcome into what ReadAt or WriteAt says.
func (img *Image) result(write bool, p []byte, off int64, n int, err error) error {
	op := "read"
	if write {
		op = "write"
	}
	switch {
	case n == len(p):
		return nil
	case err != nil:
		return img.ioErr(op, err)
	default:
		// The range is inside the size we saw at open, so the file shrank.
		return fmt.Errorf("raw: %s: %s %d of %d bytes at offset %d (file shorter than its size %d): %w",
			img.path, op, n, len(p), off, img.size, io.ErrUnexpectedEOF)
	}
}
