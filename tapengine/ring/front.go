package ring

import (
	"fmt"

	"github.com/blktap-go/blktap/tapengine/blkif"
)

// Front is the frontend half of a ring: it produces requests and consumes
// responses. It is not safe for concurrent use; the caller serialises.
type Front struct {
	ring    []byte
	proto   blkif.Protocol
	slot    int
	entries uint32

	reqProdPvt uint32 // next request slot to fill
	rspCons    uint32 // next response to copy out
}

// NewFront takes a ring of 4096<<order bytes. Call Init on a new ring.
func NewFront(ring []byte, proto blkif.Protocol) (*Front, error) {
	if !proto.Valid() {
		return nil, fmt.Errorf("%w: protocol %v", ErrBadRing, proto)
	}
	order, err := orderOf(len(ring))
	if err != nil {
		return nil, err
	}
	return &Front{ring: ring, proto: proto, slot: proto.SlotSize(), entries: uint32(blkif.Entries(proto, order))}, nil
}

// Init is SHARED_RING_INIT: producers 0, events 1, header padding zeroed.
// Only the frontend initialises a ring, once, before granting it.
func (f *Front) Init() {
	clear(f.ring[:blkif.RingHeaderSize])
	store32(f.ring, blkif.OffReqProd, 0)
	store32(f.ring, blkif.OffRspProd, 0)
	store32(f.ring, blkif.OffReqEvent, 1)
	store32(f.ring, blkif.OffRspEvent, 1)
	f.reqProdPvt, f.rspCons = 0, 0
}

// Entries is the number of slots.
func (f *Front) Entries() int { return int(f.entries) }

func (f *Front) slotAt(i uint32) []byte {
	off := blkif.RingHeaderSize + int(i&(f.entries-1))*f.slot
	return f.ring[off : off+f.slot]
}

// Free is the number of requests that can be pushed now.
func (f *Front) Free() int { return int(f.entries - (f.reqProdPvt - f.rspCons)) }

// Push writes r into the next free slot (not yet published).
func (f *Front) Push(r *blkif.Request) error {
	if f.Free() == 0 {
		return ErrRingFull
	}
	f.proto.EncodeRequest(f.slotAt(f.reqProdPvt), r)
	f.reqProdPvt++
	return nil
}

// PushRequests publishes the pushed requests and reports whether the
// backend must be kicked (req_event in (old, new]).
func (f *Front) PushRequests() bool {
	old := load32(f.ring, blkif.OffReqProd)
	nw := f.reqProdPvt
	if old == nw {
		return false
	}
	store32(f.ring, blkif.OffReqProd, nw)
	ev := load32(f.ring, blkif.OffReqEvent)
	return nw-ev < nw-old
}

// Pending reports how many responses are published and not consumed. A
// backend that answers more than was asked is hostile.
func (f *Front) Pending() (int, error) {
	prod := load32(f.ring, blkif.OffRspProd)
	if prod-f.rspCons > f.reqProdPvt-f.rspCons {
		return 0, fmt.Errorf("%w: rsp_prod %d is past the requests sent (%d)", ErrHostile, prod, f.reqProdPvt)
	}
	return int(prod - f.rspCons), nil
}

// Next copies the next response out of its slot. Call it only for
// responses Pending reported.
func (f *Front) Next(r *blkif.Response) {
	f.proto.DecodeResponse(f.slotAt(f.rspCons), r)
	f.rspCons++
}

// FinalCheck is called with nothing left to consume, before sleeping:
// it asks to be notified of the next response, then re-reads rsp_prod.
func (f *Front) FinalCheck() (more bool, err error) {
	n, err := f.Pending()
	if err != nil || n > 0 {
		return n > 0, err
	}
	store32(f.ring, blkif.OffRspEvent, f.rspCons+1)
	n, err = f.Pending()
	return n > 0, err
}

// Quiet asks not to be notified of responses: rsp_event at rsp_cons,
// which rsp_prod has already reached, so no publish crosses it. The
// caller consumes by polling instead, and must end with FinalCheck
// (which asks again) before anyone sleeps on the notifications.
func (f *Front) Quiet() { store32(f.ring, blkif.OffRspEvent, f.rspCons) }

// InFlight is the number of pushed requests without a consumed response.
func (f *Front) InFlight() int { return int(f.reqProdPvt - f.rspCons) }
