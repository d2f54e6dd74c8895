package frontend

import (
	"fmt"

	"github.com/blktap-go/blktap/tapengine/blkif"
)

// Submitting a request, in order (the blkif front-end's duties):
//
//  1. With the tag held, encode the request: its segments name the tag's
//     data pages; past 11 pages the segment list goes in the tag's
//     indirect pages (encodeRequest).
//  2. Under mu: grant those pages (a write's read-only), push the
//     request into the next slot and mark the tag busy (push).
//  3. Publish: move req_prod past everything pushed and kick the backend
//     if its event index asks for it. A started request may skip this
//     step (hold); Publish, takeFree or the next blocking call does it.

// submit pushes one request on tag id: op over [off, off+n) of the disk,
// with the data in the tag's pages. n is a multiple of 512, at most
// f.chunk (0 for a flush). Unless hold, it publishes every request pushed
// so far (and kicks when the backend asks).
func (f *Frontend) submit(id uint16, op uint8, off int64, n int, hold bool) error {
	req, pages, indPages := f.encodeRequest(id, op, off, n)
	f.mu.Lock()
	if err := f.pushLocked(id, op, &req, pages, indPages); err != nil {
		f.mu.Unlock()
		return err
	}
	if hold {
		f.held = true
		f.mu.Unlock()
		return nil
	}
	return f.publishLocked()
}

// encodeRequest builds tag id's request for op over [off, off+n) and
// reports how many data and indirect pages it uses. More than 11 pages go
// as an indirect request, whose segment list it writes into the tag's
// indirect pages (not yet granted: the backend cannot see them).
func (f *Frontend) encodeRequest(id uint16, op uint8, off int64, n int) (req blkif.Request, pages, indPages int) {
	t := &f.tags[id]
	req = blkif.Request{Op: op, ID: uint64(id), Sector: uint64(off) / sector}
	pages = (n + pageSize - 1) / pageSize
	switch {
	case op == blkif.OpDiscard:
		req.NrSectors = uint64(n) / sector
		pages = 0
	case pages > blkif.SegmentsMax:
		indPages = (pages + blkif.SegmentsPerIndirect - 1) / blkif.SegmentsPerIndirect
		req = blkif.Request{Op: blkif.OpIndirect, IndirectOp: op, IndirectSegments: uint16(pages), ID: req.ID, Sector: req.Sector}
		list := f.gt.Memory(t.ind, indPages)
		for i := range pages {
			blkif.EncodeSegment(list[i*blkif.SegmentSize:], &blkif.Segment{Gref: t.first + uint32(i), LastSect: lastSector(n, i)})
		}
		for i := range indPages {
			req.IndirectGrefs[i] = t.ind + uint32(i)
		}
	default:
		for i := range pages {
			req.Seg[i] = blkif.Segment{Gref: t.first + uint32(i), FirstSect: 0, LastSect: lastSector(n, i)}
		}
		req.NrSegments = uint8(pages)
	}
	return req, pages, indPages
}

// lastSector is the last sector of page i that a request of n bytes
// fills.
func lastSector(n, i int) uint8 {
	return uint8(min(n-i*pageSize, pageSize)/sector - 1)
}

// pushLocked grants the pages of tag id's request req, for op, and pushes
// it (not yet published). Caller holds f.mu.
func (f *Frontend) pushLocked(id uint16, op uint8, req *blkif.Request, pages, indPages int) error {
	if f.closed {
		return f.closeErr
	}
	t := &f.tags[id]
	for i := range pages {
		// A write only lets the backend read the page.
		if err := f.gt.Grant(t.first+uint32(i), op != blkif.OpRead); err != nil {
			return err
		}
	}
	for i := range indPages {
		if err := f.gt.Grant(t.ind+uint32(i), true); err != nil {
			return err
		}
	}
	t.nPages, t.nIndPgs = pages, indPages
	if err := f.front.Push(req); err != nil {
		// One tag per slot: the ring cannot be full while we hold a tag.
		return fmt.Errorf("frontend: %w", err)
	}
	t.busy = true
	return nil
}

// publishLocked publishes the pushed requests and kicks the backend if it
// asked; it releases f.mu.
func (f *Frontend) publishLocked() error {
	f.held = false
	kick := f.front.PushRequests()
	f.mu.Unlock()
	if kick {
		return f.ch.Kick()
	}
	return nil
}

// Publish lets the backend see the requests started so far. A caller of
// StartRead / StartWrite calls it before it goes to sleep (e.g. waiting for
// its client), so nothing it started is left held back.
func (f *Frontend) Publish() error {
	f.mu.Lock()
	if !f.held || f.closed {
		f.mu.Unlock()
		return nil
	}
	return f.publishLocked()
}
