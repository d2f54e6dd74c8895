// Package blkif is the Xen block-ring ABI as plain Go values encoded at
// fixed byte offsets: the shared-ring header, requests, responses and
// segments, in both layouts a guest may use. It does no I/O and keeps no
// state, so the backend, the local frontend, tests and fuzzers share it.
//
// Every integer is in the guest's native byte order, which is little-endian
// on every architecture Xen supports (x86, Arm).
//
// Shared ring page(s), 4096 << order bytes (ring.h):
//
//	 0      4          8        12         16       20            64
//	+--------+----------+--------+----------+--------+-------------+--------
//	|req_prod|req_event |rsp_prod|rsp_event | pvt[4] | pad[44]     | slot 0, slot 1, ...
//	+--------+----------+--------+----------+--------+-------------+--------
//
// Each slot is a union of one request and one response, so it is as large
// as a request: 112 bytes (x86_64, arm) or 108 bytes (x86_32, where u64
// fields are only 4-byte aligned). The number of slots is the largest
// power of two that fits: 32 << order for both layouts.
//
// Read/write request (x86_64 offsets; x86_32 in brackets):
//
//	 0    1        2       4     8 [4]      16 [12]        24 [20]
//	+----+--------+-------+-----+----------+--------------+------------------+
//	| op | nr_seg | handle| pad | id u64   | sector u64   | seg[11] x 8 B    |
//	+----+--------+-------+-----+----------+--------------+------------------+
//	                                             total 112 [108]
//
// Segment (8 bytes): gref u32 @0, first_sect u8 @4, last_sect u8 @5, pad.
//
// Discard request: op @0, flag @1 (bit 0 = secure), handle @2, id @8 [4],
// sector @16 [12], nr_sectors u64 @24 [20].
//
// Indirect request: op @0, indirect_op @1, nr_segments u16 @2, id @8 [4],
// sector @16 [12], handle @24 [20], indirect_grefs[8] u32 @28 [24]. Each
// indirect page holds 512 segments in the 8-byte layout above.
//
// Response: id u64 @0, operation u8 @8, status s16 @10; 16 [12] bytes.
//
// Sector numbers and first/last_sect are always in 512-byte units, whatever
// the disk's sector-size.
package blkif

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Protocol names a request/response layout, as the frontend's "protocol"
// xenstore key does.
type Protocol uint8

const (
	// X86_32 is the packed layout of 32-bit x86 guests (u64 4-byte
	// aligned). It is the default when the frontend writes no protocol key,
	// as in Linux blkback and tapback.
	X86_32 Protocol = iota
	// X86_64 is the naturally aligned layout of 64-bit x86 guests.
	X86_64
	// ARM is "arm-abi"; it uses the X86_64 layout.
	ARM
)

// ErrProtocol: an unknown protocol name.
var ErrProtocol = errors.New("blkif: unknown protocol")

// ParseProtocol maps a frontend's "protocol" key to a layout. An empty
// string means X86_32 (the Linux blkback and tapback default).
func ParseProtocol(s string) (Protocol, error) {
	switch s {
	case "", "x86_32-abi":
		return X86_32, nil
	case "x86_64-abi":
		return X86_64, nil
	case "arm-abi":
		return ARM, nil
	}
	return 0, fmt.Errorf("%w %q", ErrProtocol, s)
}

func (p Protocol) String() string {
	switch p {
	case X86_32:
		return "x86_32-abi"
	case X86_64:
		return "x86_64-abi"
	case ARM:
		return "arm-abi"
	}
	return fmt.Sprintf("Protocol(%d)", uint8(p))
}

// Valid reports whether p is one of the known layouts.
func (p Protocol) Valid() bool { return p <= ARM }

// packed reports whether p uses 4-byte alignment for u64 fields.
func (p Protocol) packed() bool { return p == X86_32 }

// Operations (blkif.h BLKIF_OP_*).
const (
	OpRead           uint8 = 0
	OpWrite          uint8 = 1
	OpWriteBarrier   uint8 = 2
	OpFlushDiskcache uint8 = 3
	OpReserved1      uint8 = 4 // device-specific packet (SLES); never served
	OpDiscard        uint8 = 5
	OpIndirect       uint8 = 6
)

// OpName names an operation for logs and stats.
func OpName(op uint8) string {
	switch op {
	case OpRead:
		return "read"
	case OpWrite:
		return "write"
	case OpWriteBarrier:
		return "write_barrier"
	case OpFlushDiskcache:
		return "flush_diskcache"
	case OpReserved1:
		return "reserved_1"
	case OpDiscard:
		return "discard"
	case OpIndirect:
		return "indirect"
	}
	return fmt.Sprintf("op(%d)", op)
}

// Response statuses (BLKIF_RSP_*).
const (
	StatusOK         int16 = 0
	StatusError      int16 = -1
	StatusEOPNOTSUPP int16 = -2
)

// Sizes and limits.
const (
	SegmentsMax         = 11   // BLKIF_MAX_SEGMENTS_PER_REQUEST
	SectorSize          = 512  // unit of sector numbers and first/last_sect
	PageSize            = 4096 // a granted page
	SectorsPerPage      = PageSize / SectorSize
	RingHeaderSize      = 64
	SegmentSize         = 8   // struct blkif_request_segment
	IndirectPagesMax    = 8   // BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
	SegmentsPerIndirect = 512 // PageSize / SegmentSize
	MaxRingOrder        = 4   // what we accept (Linux blkback's default max)
	DiscardSecure       = 1   // bit 0 of a discard request's flag
)

// Ring header offsets (struct blkif_sring).
const (
	OffReqProd  = 0
	OffReqEvent = 4
	OffRspProd  = 8
	OffRspEvent = 12
)

// Segment is one granted page's part of a request: sectors
// [FirstSect, LastSect] of page Gref, each 512 bytes.
type Segment struct {
	Gref      uint32
	FirstSect uint8
	LastSect  uint8
}

// Request is a decoded ring request. Which fields mean something depends
// on Op: read/write/barrier/flush use NrSegments and Seg; discard uses
// Flag and NrSectors; indirect uses IndirectOp, IndirectSegments and
// IndirectGrefs.
type Request struct {
	Op         uint8
	NrSegments uint8
	Handle     uint16
	ID         uint64
	Sector     uint64
	Seg        [SegmentsMax]Segment

	// Discard.
	NrSectors uint64
	Flag      uint8

	// Indirect.
	IndirectOp       uint8
	IndirectSegments uint16
	IndirectGrefs    [IndirectPagesMax]uint32
}

// Response is a decoded ring response.
type Response struct {
	ID     uint64
	Op     uint8
	Status int16
}

// RequestSize is sizeof(blkif_request_t) in this layout.
func (p Protocol) RequestSize() int {
	if p.packed() {
		return 108
	}
	return 112
}

// ResponseSize is sizeof(blkif_response_t) in this layout.
func (p Protocol) ResponseSize() int {
	if p.packed() {
		return 12
	}
	return 16
}

// SlotSize is the size of one ring slot (the request/response union).
func (p Protocol) SlotSize() int { return p.RequestSize() }

// Entries is the number of slots in a ring of 2^order pages: the largest
// power of two that fits after the 64-byte header (ring.h __RD32).
// It returns 0 for an order outside [0, MaxRingOrder].
func Entries(p Protocol, order int) int {
	if order < 0 || order > MaxRingOrder {
		return 0
	}
	n := (PageSize<<order - RingHeaderSize) / p.SlotSize()
	e := 1
	for e*2 <= n {
		e *= 2
	}
	return e
}

// RingSize is the byte size of a ring of 2^order pages.
func RingSize(order int) int { return PageSize << order }

// layout holds the field offsets that differ between the two ABIs.
type layout struct {
	id, sector, seg     int // read/write
	nrSectors           int // discard
	indHandle, indGrefs int // indirect
}

var (
	layout64 = layout{id: 8, sector: 16, seg: 24, nrSectors: 24, indHandle: 24, indGrefs: 28}
	layout32 = layout{id: 4, sector: 12, seg: 20, nrSectors: 20, indHandle: 20, indGrefs: 24}
)

func (p Protocol) layout() *layout {
	if p.packed() {
		return &layout32
	}
	return &layout64
}

var le = binary.LittleEndian

// DecodeRequest copies the request in b (at least RequestSize bytes, e.g. a
// ring slot) into r. It reads each byte of b at most once, so a caller that
// validates r afterwards is safe against a guest rewriting the slot
// meanwhile. It never fails: the caller validates the fields. Fields the
// op does not use are zeroed.
func (p Protocol) DecodeRequest(b []byte, r *Request) {
	l := p.layout()
	b = b[:p.RequestSize()]
	*r = Request{}
	r.Op = b[0]
	r.ID = le.Uint64(b[l.id:])
	r.Sector = le.Uint64(b[l.sector:])
	switch r.Op {
	case OpDiscard:
		r.Flag = b[1]
		r.Handle = le.Uint16(b[2:])
		r.NrSectors = le.Uint64(b[l.nrSectors:])
	case OpIndirect:
		r.IndirectOp = b[1]
		r.IndirectSegments = le.Uint16(b[2:])
		r.Handle = le.Uint16(b[l.indHandle:])
		for i := range r.IndirectGrefs {
			r.IndirectGrefs[i] = le.Uint32(b[l.indGrefs+4*i:])
		}
	default:
		r.NrSegments = b[1]
		r.Handle = le.Uint16(b[2:])
		// Decode all 11 slots whatever nr_segments says: the count is
		// validated later, from this copy.
		for i := range r.Seg {
			DecodeSegment(b[l.seg+SegmentSize*i:], &r.Seg[i])
		}
	}
}

// EncodeRequest writes r into b (at least RequestSize bytes) in this
// layout, zeroing padding. Used by frontends and tests.
func (p Protocol) EncodeRequest(b []byte, r *Request) {
	l := p.layout()
	b = b[:p.RequestSize()]
	clear(b)
	b[0] = r.Op
	le.PutUint64(b[l.id:], r.ID)
	le.PutUint64(b[l.sector:], r.Sector)
	switch r.Op {
	case OpDiscard:
		b[1] = r.Flag
		le.PutUint16(b[2:], r.Handle)
		le.PutUint64(b[l.nrSectors:], r.NrSectors)
	case OpIndirect:
		b[1] = r.IndirectOp
		le.PutUint16(b[2:], r.IndirectSegments)
		le.PutUint16(b[l.indHandle:], r.Handle)
		for i, g := range r.IndirectGrefs {
			le.PutUint32(b[l.indGrefs+4*i:], g)
		}
	default:
		b[1] = r.NrSegments
		le.PutUint16(b[2:], r.Handle)
		for i := range r.Seg {
			EncodeSegment(b[l.seg+SegmentSize*i:], &r.Seg[i])
		}
	}
}

// DecodeSegment reads one 8-byte segment descriptor (also the layout of
// each entry of an indirect page).
func DecodeSegment(b []byte, s *Segment) {
	b = b[:SegmentSize]
	s.Gref = le.Uint32(b)
	s.FirstSect = b[4]
	s.LastSect = b[5]
}

// EncodeSegment writes one 8-byte segment descriptor, zeroing its padding.
func EncodeSegment(b []byte, s *Segment) {
	b = b[:SegmentSize]
	le.PutUint32(b, s.Gref)
	b[4] = s.FirstSect
	b[5] = s.LastSect
	b[6], b[7] = 0, 0
}

// EncodeResponse writes r into b (at least ResponseSize bytes). The offsets
// are the same in both layouts; only the padded size differs.
func (p Protocol) EncodeResponse(b []byte, r *Response) {
	b = b[:p.ResponseSize()]
	le.PutUint64(b, r.ID)
	b[8] = r.Op
	b[9] = 0
	le.PutUint16(b[10:], uint16(r.Status))
	if len(b) > 12 {
		clear(b[12:])
	}
}

// DecodeResponse copies the response in b into r.
func (p Protocol) DecodeResponse(b []byte, r *Response) {
	b = b[:p.ResponseSize()]
	r.ID = le.Uint64(b)
	r.Op = b[8]
	r.Status = int16(le.Uint16(b[10:]))
}
