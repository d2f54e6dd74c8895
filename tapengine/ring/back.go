package ring

import (
	"fmt"

	"github.com/blktap-go/blktap/tapengine/blkif"
)

// Back is the backend half of a ring: it consumes requests and produces
// responses. It is not safe for concurrent use; one loop owns it.
type Back struct {
	ring    []byte
	proto   blkif.Protocol
	slot    int
	entries uint32

	reqCons    uint32 // next request to copy out
	rspProdPvt uint32 // next response to stage
	rspPub     uint32 // next response to copy into the ring (= rsp_prod we wrote)

	// staged holds responses until PushResponses, indexed like the
	// slots. A response shares its slot with the request it follows, and
	// a restarted backend resumes at rsp_prod reading [rsp_prod, req_prod)
	// as requests: a response written there before rsp_prod moves would be
	// decoded as a request (a bogus id, or a fake request with segments
	// once a slot is larger than a response). Staging keeps the slots
	// past rsp_prod as the frontend wrote them through the I/O of a batch;
	// only the copy in PushResponses, with no system call in it, can still
	// be cut short.
	staged []blkif.Response
}

// NewBack attaches to a ring the frontend has already initialised. It
// resumes where the shared indices are: every request below rsp_prod has
// been answered (by us or by a previous backend), so consumption restarts
// there. That is what makes a ring servable again after a pause or a
// worker restart.
func NewBack(ring []byte, proto blkif.Protocol) (*Back, error) {
	if !proto.Valid() {
		return nil, fmt.Errorf("%w: protocol %v", ErrBadRing, proto)
	}
	order, err := orderOf(len(ring))
	if err != nil {
		return nil, err
	}
	b := &Back{ring: ring, proto: proto, slot: proto.SlotSize(), entries: uint32(blkif.Entries(proto, order))}
	b.rspProdPvt = load32(ring, blkif.OffRspProd)
	b.rspPub = b.rspProdPvt
	b.reqCons = b.rspProdPvt
	b.staged = make([]blkif.Response, b.entries)
	return b, nil
}

// Entries is the number of slots.
func (b *Back) Entries() int { return int(b.entries) }

func (b *Back) slotAt(i uint32) []byte {
	off := blkif.RingHeaderSize + int(i&(b.entries-1))*b.slot
	return b.ring[off : off+b.slot]
}

// Pending reports how many published requests are not yet consumed. An
// honest frontend never has more than a ring of requests unanswered
// (req_prod - rsp_prod_pvt <= entries); anything else, including an index
// that went backwards, is hostile.
func (b *Back) Pending() (int, error) {
	prod := load32(b.ring, blkif.OffReqProd)
	if prod-b.rspProdPvt > b.entries {
		return 0, fmt.Errorf("%w: req_prod %d is more than a ring (%d) ahead of responses %d",
			ErrHostile, prod, b.entries, b.rspProdPvt)
	}
	return int(prod - b.reqCons), nil
}

// Next copies the next request out of its slot into r. Call it only for
// requests Pending reported.
func (b *Back) Next(r *blkif.Request) {
	b.proto.DecodeRequest(b.slotAt(b.reqCons), r)
	b.reqCons++
}

// Respond stages the next response in the backend's own memory; the ring
// sees it at PushResponses. Responses may come in any order, but never
// more than requests consumed.
func (b *Back) Respond(r *blkif.Response) {
	b.staged[b.rspProdPvt&(b.entries-1)] = *r
	b.rspProdPvt++
}

// Unconsume puts back the request Next copied last, for the next backend
// on this ring to take again, and reports whether it could: only when it
// is the one request consumed and not answered (rsp_prod is where a new
// backend resumes, so nothing before it may be left unanswered).
func (b *Back) Unconsume() bool {
	if b.reqCons-b.rspProdPvt != 1 || b.rspPub != b.rspProdPvt {
		return false
	}
	b.reqCons--
	return true
}

// InFlight is the number of consumed requests without a response.
func (b *Back) InFlight() int { return int(b.reqCons - b.rspProdPvt) }

// PushResponses writes the staged responses into their slots, publishes
// them and reports whether the frontend must be notified (rsp_event in
// (old, new]).
func (b *Back) PushResponses() bool {
	nw := b.rspProdPvt
	// The private index bounds the copy: the frontend can scribble on
	// rsp_prod, but not make us write more slots than we answered.
	for i := b.rspPub; i != nw; i++ {
		b.proto.EncodeResponse(b.slotAt(i), &b.staged[i&(b.entries-1)])
	}
	b.rspPub = nw
	old := load32(b.ring, blkif.OffRspProd)
	if old == nw {
		return false
	}
	store32(b.ring, blkif.OffRspProd, nw)
	ev := load32(b.ring, blkif.OffRspEvent)
	return nw-ev < nw-old
}

// FinalCheck is called with nothing left to consume, before sleeping: it
// asks to be kicked for the next request, then re-reads the producer
// index so a request published meanwhile is not slept through.
func (b *Back) FinalCheck() (more bool, err error) {
	n, err := b.Pending()
	if err != nil || n > 0 {
		return n > 0, err
	}
	store32(b.ring, blkif.OffReqEvent, b.reqCons+1)
	n, err = b.Pending()
	return n > 0, err
}
