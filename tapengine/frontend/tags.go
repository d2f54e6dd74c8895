package frontend

import (
	"errors"

	"github.com/blktap-go/blktap/tapengine/blkif"
)

// tag is one request's worth of resources, one per ring slot, so a caller
// holding a tag always finds the ring room for its request. Its id is
// the request id on the ring. A tag belongs to whoever took its id from
// Frontend.free until they give it back (release); while its request is
// in flight the goroutine that collects the response acts for them.
type tag struct {
	first uint32 // first of Frontend.segs consecutive data pages
	mem   []byte // the frontend's view of those pages
	ind   uint32 // first of the indirect pages (if any)
	done  chan int16
	// Set by a Start call before the push, read by the reaper after the
	// response (the ring's barriers order the two):
	cb     Completer // nil for a blocking call
	cookie uint64
	op     uint8 // of a started request
	n      int   // bytes of a started read
	lent   bool  // owned by a TakeTag caller: the reaper does not free it
	// Guarded by Frontend.mu:
	busy    bool // pushed, response not yet consumed
	nPages  int  // data pages granted for the request in flight
	nIndPgs int  // indirect pages granted for it
}

// indirectPages is how many indirect pages each tag has: enough for the
// segment list of its f.segs pages, none when 11 fit in the request.
func (f *Frontend) indirectPages() int {
	if f.segs <= blkif.SegmentsMax {
		return 0
	}
	return (f.segs + blkif.SegmentsPerIndirect - 1) / blkif.SegmentsPerIndirect
}

// allocTags gives each of the entries tags its data pages and, right
// after them, its indirect pages (Trim punches the two as one range),
// and puts every tag on the free list.
func (f *Frontend) allocTags(entries int) error {
	indPages := f.indirectPages()
	f.tags = make([]tag, entries)
	f.free = make(chan uint16, entries)
	for i := range f.tags {
		first, err := f.gt.Alloc(f.segs)
		if err != nil {
			return err
		}
		f.tags[i] = tag{first: first, mem: f.gt.Memory(first, f.segs), done: make(chan int16, 1)}
		if indPages > 0 {
			if f.tags[i].ind, err = f.gt.Alloc(indPages); err != nil {
				return err
			}
		}
		f.free <- uint16(i)
	}
	return nil
}

// acquire takes a free tag, or fails when the frontend closes.
func (f *Frontend) acquire() (uint16, error) {
	select {
	case id := <-f.free:
		return id, nil
	default:
	}
	select {
	case id := <-f.free:
		return id, nil
	case <-f.closedCh:
		return 0, f.closeErr
	}
}

// release gives tag id back. A tag whose request may still be in flight
// when the frontend closed is never given back: nothing waits for a free
// tag once closed, and the backend may still write its pages.
func (f *Frontend) release(id uint16) { f.free <- id }

// giveBack releases tag id after its request ended with err, unless the
// frontend closed under it: then the request may still be in flight and
// the tag is never reused.
func (f *Frontend) giveBack(id uint16, err error) {
	if err == nil || !errors.Is(err, ErrClosed) {
		f.release(id)
	}
}

// takeFree takes a free tag for a Start or TakeTag caller, which may hold
// requests back: when every tag is in flight, those must go out first,
// or no tag comes back.
func (f *Frontend) takeFree() (uint16, error) {
	select {
	case id := <-f.free:
		return id, nil
	default:
	}
	if err := f.Publish(); err != nil {
		return 0, err
	}
	return f.acquire()
}
