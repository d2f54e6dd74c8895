package frontend

import (
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/tapengine/blkif"
)

// Started calls: StartRead and StartWrite push one request and return;
// the goroutine that collects its response (the reaper, or a caller of
// Poll) hands the result to the request's Completer. Pushed requests are
// held back until Publish (see submit), so a reader that starts several
// costs the backend one wake-up.

// StartMax is the longest request StartRead and StartWrite take: one ring
// request (11 pages, or the indirect size both sides agreed on).
func (f *Frontend) StartMax() int { return f.chunk }

// StartRead starts reading [off, off+n) and returns without waiting: off
// and n are multiples of 512, 0 < n <= StartMax, inside the disk. c gets
// the bytes (or the error) on the reaper goroutine, with cookie. The
// request is held back until Publish (see the package doc). An error
// returned here means nothing was started and c is not called. It blocks
// only while every tag is in flight.
func (f *Frontend) StartRead(off int64, n int, c Completer, cookie uint64) error {
	return f.start(blkif.OpRead, off, n, nil, c, cookie)
}

// StartWrite is StartRead for writing p at off (p is copied before it
// returns). Complete's error is nil once the data is in the image.
func (f *Frontend) StartWrite(p []byte, off int64, c Completer, cookie uint64) error {
	return f.start(blkif.OpWrite, off, len(p), p, c, cookie)
}

func (f *Frontend) start(op uint8, off int64, n int, p []byte, c Completer, cookie uint64) error {
	if err := f.enterStart(op, off, n); err != nil {
		return err
	}
	defer f.leave()
	id, err := f.takeFree()
	if err != nil {
		return err
	}
	if p != nil {
		copy(f.tags[id].mem, p)
	}
	err = f.launch(id, op, off, n, c, cookie)
	if err != nil {
		f.giveBack(id, err)
	}
	return err
}

// enterStart admits a Start call (enter) and checks its request; on
// success the caller must leave.
func (f *Frontend) enterStart(op uint8, off int64, n int) error {
	size, ro, err := f.enter()
	if err != nil {
		return err
	}
	switch {
	case op == blkif.OpWrite && ro:
		err = ErrReadOnly
	case n <= 0 || n > f.chunk || off%sector != 0 || n%sector != 0:
		err = fmt.Errorf("frontend: %s of %d bytes at %d: not a single aligned request", blkif.OpName(op), n, off)
	default:
		if err = image.CheckRange(off, n, size); err != nil {
			err = fmt.Errorf("frontend: %w", err)
		}
	}
	if err != nil {
		f.leave()
	}
	return err
}

// launch pushes a started request on tag id (held back until Publish);
// the reaper runs c when it completes.
func (f *Frontend) launch(id uint16, op uint8, off int64, n int, c Completer, cookie uint64) error {
	t := &f.tags[id]
	t.cb, t.cookie, t.op, t.n = c, cookie, op, n
	if err := f.submit(id, op, off, n, true); err != nil {
		t.cb = nil
		return err
	}
	return nil
}
