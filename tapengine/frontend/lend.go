package frontend

import (
	"fmt"

	"github.com/blktap-go/blktap/tapengine/blkif"
)

// Lending: a caller that moves data between the disk and a socket can use
// the tags' pages as its buffers, so a read's data is written to the
// client straight from the page the backend filled and a write's payload
// is read from the client straight into the page the backend reads.
//
//  1. TakeTag: a free tag and its pages (StartMax bytes), the caller's
//     until PutTag.
//  2. For a write: fill the pages, then StartTagWrite. For a read:
//     StartTagRead; Complete's data is the pages, valid until PutTag.
//  3. PutTag once the data has been used (or the tag was not used). Close
//     does not wait for tags lent out; their memory stays mapped until the
//     last one comes back.

// TakeTag lends the caller a free tag. It blocks only while every tag is
// in flight or lent, after publishing what was held back.
func (f *Frontend) TakeTag() (uint64, []byte, error) {
	if _, _, err := f.enter(); err != nil {
		return 0, nil, err
	}
	defer f.leave()
	id, err := f.takeFree()
	if err != nil {
		return 0, nil, err
	}
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		// Never reused once closed; not counted as lent either.
		return 0, nil, f.closeErr
	}
	f.lent++
	f.mu.Unlock()
	t := &f.tags[id]
	t.lent = true
	return uint64(id), t.mem[:f.chunk], nil
}

// PutTag gives back a tag TakeTag lent (after its request completed, or
// unused).
func (f *Frontend) PutTag(h uint64) {
	t := &f.tags[h]
	t.lent = false
	f.mu.Lock()
	f.lent--
	closed := f.closed
	unmap := f.unmapLater && f.lent == 0
	if unmap {
		f.unmapLater = false
	}
	f.mu.Unlock()
	if unmap {
		if err := f.gt.Close(); err != nil {
			f.log.Warn("frontend: unmapping shared memory", "err", err)
		}
	}
	if !closed {
		f.release(uint16(h))
	}
}

// StartTagRead starts reading [off, off+n) into the lent tag h (rules as
// StartRead). Complete's data is the tag's pages, valid until PutTag.
func (f *Frontend) StartTagRead(h uint64, off int64, n int, c Completer, cookie uint64) error {
	return f.startTag(blkif.OpRead, h, off, n, c, cookie)
}

// StartTagWrite starts writing the first n bytes of the lent tag h's
// pages at off (rules as StartWrite).
func (f *Frontend) StartTagWrite(h uint64, off int64, n int, c Completer, cookie uint64) error {
	return f.startTag(blkif.OpWrite, h, off, n, c, cookie)
}

func (f *Frontend) startTag(op uint8, h uint64, off int64, n int, c Completer, cookie uint64) error {
	if h >= uint64(len(f.tags)) || !f.tags[h].lent {
		return fmt.Errorf("frontend: tag %d is not lent", h)
	}
	if err := f.enterStart(op, off, n); err != nil {
		return err
	}
	defer f.leave()
	return f.launch(uint16(h), op, off, n, c, cookie)
}
