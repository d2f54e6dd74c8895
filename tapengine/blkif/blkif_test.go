package blkif

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/internal/corpus"
	"github.com/blktap-go/blktap/internal/oracle"
)

// field is one wire field of a request or response: how to set it to a
// non-zero pattern, and where docs/WIRE.md, section "blkif requests", says it lives.
type field struct {
	name   string // C member path for offsetof(), as in blkif.h
	cType  string // C struct for offsetof()
	set    func(r *Request, s *Response)
	width  int
	off64  int
	off32  int
	isResp bool
}

func fields() []field {
	rw, disc, ind := "struct blkif_request", "struct blkif_request_discard", "struct blkif_request_indirect"
	return []field{
		{"operation", rw, func(r *Request, _ *Response) { r.Op = 0xff }, 1, 0, 0, false},
		{"nr_segments", rw, func(r *Request, _ *Response) { r.Op = OpWrite; r.NrSegments = 0xff }, 1, 1, 1, false},
		{"handle", rw, func(r *Request, _ *Response) { r.Op = OpWrite; r.Handle = 0xffff }, 2, 2, 2, false},
		{"id", rw, func(r *Request, _ *Response) { r.Op = OpWrite; r.ID = ^uint64(0) }, 8, 8, 4, false},
		{"sector_number", rw, func(r *Request, _ *Response) { r.Op = OpWrite; r.Sector = ^uint64(0) }, 8, 16, 12, false},
		{"seg[0].gref", rw, func(r *Request, _ *Response) { r.Op = OpWrite; r.Seg[0].Gref = ^uint32(0) }, 4, 24, 20, false},
		{"seg[0].first_sect", rw, func(r *Request, _ *Response) { r.Op = OpWrite; r.Seg[0].FirstSect = 0xff }, 1, 28, 24, false},
		{"seg[0].last_sect", rw, func(r *Request, _ *Response) { r.Op = OpWrite; r.Seg[0].LastSect = 0xff }, 1, 29, 25, false},
		{"seg[10].gref", rw, func(r *Request, _ *Response) { r.Op = OpWrite; r.Seg[10].Gref = ^uint32(0) }, 4, 104, 100, false},
		{"seg[10].last_sect", rw, func(r *Request, _ *Response) { r.Op = OpWrite; r.Seg[10].LastSect = 0xff }, 1, 109, 105, false},
		{"flag", disc, func(r *Request, _ *Response) { r.Op = OpDiscard; r.Flag = 0xff }, 1, 1, 1, false},
		{"handle", disc, func(r *Request, _ *Response) { r.Op = OpDiscard; r.Handle = 0xffff }, 2, 2, 2, false},
		{"id", disc, func(r *Request, _ *Response) { r.Op = OpDiscard; r.ID = ^uint64(0) }, 8, 8, 4, false},
		{"sector_number", disc, func(r *Request, _ *Response) { r.Op = OpDiscard; r.Sector = ^uint64(0) }, 8, 16, 12, false},
		{"nr_sectors", disc, func(r *Request, _ *Response) { r.Op = OpDiscard; r.NrSectors = ^uint64(0) }, 8, 24, 20, false},
		{"indirect_op", ind, func(r *Request, _ *Response) { r.Op = OpIndirect; r.IndirectOp = 0xff }, 1, 1, 1, false},
		{"nr_segments", ind, func(r *Request, _ *Response) { r.Op = OpIndirect; r.IndirectSegments = 0xffff }, 2, 2, 2, false},
		{"id", ind, func(r *Request, _ *Response) { r.Op = OpIndirect; r.ID = ^uint64(0) }, 8, 8, 4, false},
		{"sector_number", ind, func(r *Request, _ *Response) { r.Op = OpIndirect; r.Sector = ^uint64(0) }, 8, 16, 12, false},
		{"handle", ind, func(r *Request, _ *Response) { r.Op = OpIndirect; r.Handle = 0xffff }, 2, 24, 20, false},
		{"indirect_grefs[0]", ind, func(r *Request, _ *Response) { r.Op = OpIndirect; r.IndirectGrefs[0] = ^uint32(0) }, 4, 28, 24, false},
		{"indirect_grefs[7]", ind, func(r *Request, _ *Response) { r.Op = OpIndirect; r.IndirectGrefs[7] = ^uint32(0) }, 4, 56, 52, false},
		{"id", "struct blkif_response", func(_ *Request, s *Response) { s.ID = ^uint64(0) }, 8, 0, 0, true},
		{"operation", "struct blkif_response", func(_ *Request, s *Response) { s.Op = 0xff }, 1, 8, 8, true},
		{"status", "struct blkif_response", func(_ *Request, s *Response) { s.Status = -1 }, 2, 10, 10, true},
	}
}

// measure encodes a value with only f set and returns where its non-zero
// bytes landed, so the offsets come from the encoder itself.
func measure(t *testing.T, p Protocol, f field) (off, width int) {
	t.Helper()
	var r Request
	var s Response
	f.set(&r, &s)
	buf := bytes.Repeat([]byte{0xee}, 256) // padding must be zeroed
	if f.isResp {
		p.EncodeResponse(buf, &s)
		buf = buf[:p.ResponseSize()]
	} else {
		p.EncodeRequest(buf, &r)
		buf = buf[:p.RequestSize()]
	}
	// The op byte is part of every request; ignore it unless it is f.
	first, last := -1, -1
	for i, c := range buf {
		if c == 0 || (i == 0 && !f.isResp && f.name != "operation") {
			continue
		}
		if first < 0 {
			first = i
		}
		last = i
	}
	if first < 0 {
		t.Fatalf("%v %s %s: nothing encoded", p, f.cType, f.name)
	}
	return first, last - first + 1
}

// TestWireOffsets checks every offset and size in docs/WIRE.md, sections "blkif ring" and "blkif requests", for
// both layouts, byte by byte, against what the encoder writes.
func TestWireOffsets(t *testing.T) {
	for _, p := range []Protocol{X86_64, X86_32, ARM} {
		for _, f := range fields() {
			off, w := measure(t, p, f)
			want := f.off64
			if p == X86_32 {
				want = f.off32
			}
			if off != want || w != f.width {
				t.Errorf("%v %s.%s: at %d width %d, want %d width %d", p, f.cType, f.name, off, w, want, f.width)
			}
		}
	}
	sizes := []struct {
		p              Protocol
		req, rsp, slot int
	}{{X86_64, 112, 16, 112}, {X86_32, 108, 12, 108}, {ARM, 112, 16, 112}}
	for _, s := range sizes {
		if s.p.RequestSize() != s.req || s.p.ResponseSize() != s.rsp || s.p.SlotSize() != s.slot {
			t.Errorf("%v: sizes %d/%d/%d want %d/%d/%d", s.p, s.p.RequestSize(), s.p.ResponseSize(), s.p.SlotSize(), s.req, s.rsp, s.slot)
		}
		for order := 0; order <= MaxRingOrder; order++ {
			if got := Entries(s.p, order); got != 32<<order {
				t.Errorf("Entries(%v, %d) = %d, want %d", s.p, order, got, 32<<order)
			}
		}
	}
	if Entries(X86_64, 5) != 0 || Entries(X86_64, -1) != 0 {
		t.Error("Entries accepts an order outside [0,4]")
	}
	// Ring header (ring.h): four u32 indices, then pvt[4], pad[44].
	if OffReqProd != 0 || OffReqEvent != 4 || OffRspProd != 8 || OffRspEvent != 12 || RingHeaderSize != 64 {
		t.Error("ring header offsets differ from docs/WIRE.md, section \"blkif ring\"")
	}
}

// TestWireOffsetsC compiles blkif.h (libxen-dev) with gcc, natively for
// x86_64 and with -m32 for x86_32, asserting each offset the encoder uses.
func TestWireOffsetsC(t *testing.T) {
	gcc := oracle.Require(t, "gcc")
	if _, err := os.Stat("/usr/include/xen/io/blkif.h"); err != nil {
		if oracle.InCI() {
			t.Fatal("blkif.h missing (apt-get install libxen-dev): required under CI")
		}
		t.Skip("blkif.h missing (apt-get install libxen-dev)")
	}
	for _, c := range []struct {
		p    Protocol
		flag string
	}{{X86_64, "-m64"}, {X86_32, "-m32"}} {
		var src strings.Builder
		src.WriteString("#include <stdint.h>\n#include <stddef.h>\n#include <xen/io/blkif.h>\n")
		n := 0
		assert := func(expr string, v int) {
			n++
			fmt.Fprintf(&src, "_Static_assert((%s) == %d, \"%s\");\n", expr, v, strings.ReplaceAll(expr, "\"", ""))
		}
		for _, f := range fields() {
			off, w := measure(t, c.p, f)
			assert(fmt.Sprintf("offsetof(%s, %s)", f.cType, f.name), off)
			mem := fmt.Sprintf("((%s *)0)->%s", f.cType, f.name)
			assert("sizeof("+mem+")", w)
		}
		assert("sizeof(blkif_request_t)", c.p.RequestSize())
		assert("sizeof(blkif_response_t)", c.p.ResponseSize())
		assert("sizeof(union blkif_sring_entry)", c.p.SlotSize())
		assert("sizeof(struct blkif_request_segment)", SegmentSize)
		assert("offsetof(blkif_sring_t, req_prod)", OffReqProd)
		assert("offsetof(blkif_sring_t, req_event)", OffReqEvent)
		assert("offsetof(blkif_sring_t, rsp_prod)", OffRspProd)
		assert("offsetof(blkif_sring_t, rsp_event)", OffRspEvent)
		assert("offsetof(blkif_sring_t, ring)", RingHeaderSize)
		assert("BLKIF_MAX_SEGMENTS_PER_REQUEST", SegmentsMax)
		assert("BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST", IndirectPagesMax)
		assert("BLKIF_OP_READ", int(OpRead))
		assert("BLKIF_OP_WRITE", int(OpWrite))
		assert("BLKIF_OP_WRITE_BARRIER", int(OpWriteBarrier))
		assert("BLKIF_OP_FLUSH_DISKCACHE", int(OpFlushDiskcache))
		assert("BLKIF_OP_RESERVED_1", int(OpReserved1))
		assert("BLKIF_OP_DISCARD", int(OpDiscard))
		assert("BLKIF_OP_INDIRECT", int(OpIndirect))
		assert("BLKIF_RSP_OKAY", int(StatusOK))
		assert("BLKIF_RSP_ERROR", int(StatusError))
		assert("BLKIF_RSP_EOPNOTSUPP", int(StatusEOPNOTSUPP))
		assert("BLKIF_DISCARD_SECURE", DiscardSecure)
		// __RING_SIZE over a page of the real sring type.
		for order := 0; order <= MaxRingOrder; order++ {
			assert(fmt.Sprintf("__CONST_RING_SIZE(blkif, %d)", PageSize<<order), Entries(c.p, order))
		}
		file := filepath.Join(t.TempDir(), "abi.c")
		if err := os.WriteFile(file, []byte(src.String()), 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(gcc, c.flag, "-ffreestanding", "-fsyntax-only", file).CombinedOutput()
		if err != nil {
			t.Errorf("%v: gcc %s disagrees with the Go layout:\n%s", c.p, c.flag, out)
		} else {
			t.Logf("%v: %d assertions hold in gcc %s", c.p, n, c.flag)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	reqs := []Request{
		{Op: OpRead, NrSegments: 11, Handle: 0x1234, ID: 0xdeadbeefcafef00d, Sector: 1 << 40,
			Seg: [SegmentsMax]Segment{0: {1, 0, 7}, 1: {2, 3, 4}, 10: {0xffffffff, 7, 7}}},
		{Op: OpWrite, NrSegments: 1, ID: 1, Seg: [SegmentsMax]Segment{{9, 0, 0}}},
		{Op: OpFlushDiskcache, ID: 77},
		{Op: OpDiscard, Flag: DiscardSecure, Handle: 5, ID: 3, Sector: 99, NrSectors: 1 << 33},
		{Op: OpIndirect, IndirectOp: OpWrite, IndirectSegments: 300, Handle: 7, ID: 8, Sector: 9,
			IndirectGrefs: [IndirectPagesMax]uint32{1, 2, 3, 4, 5, 6, 7, 0xfffffffe}},
	}
	for _, p := range []Protocol{X86_32, X86_64} {
		for _, r := range reqs {
			b := make([]byte, p.RequestSize())
			p.EncodeRequest(b, &r)
			var got Request
			p.DecodeRequest(b, &got)
			if got != r {
				t.Errorf("%v: round trip\n got %+v\nwant %+v", p, got, r)
			}
		}
		rsp := Response{ID: 0x0102030405060708, Op: OpIndirect, Status: StatusEOPNOTSUPP}
		b := make([]byte, p.ResponseSize())
		p.EncodeResponse(b, &rsp)
		var got Response
		p.DecodeResponse(b, &got)
		if got != rsp {
			t.Errorf("%v: response round trip %+v want %+v", p, got, rsp)
		}
	}
}

func TestParseProtocol(t *testing.T) {
	for in, want := range map[string]Protocol{"": X86_32, "x86_32-abi": X86_32, "x86_64-abi": X86_64, "arm-abi": ARM} {
		got, err := ParseProtocol(in)
		if err != nil || got != want {
			t.Errorf("ParseProtocol(%q) = %v, %v; want %v", in, got, err, want)
		}
		if in != "" && got.String() != in {
			t.Errorf("%v.String() = %q, want %q", got, got.String(), in)
		}
	}
	if _, err := ParseProtocol("x86_64"); !errors.Is(err, ErrProtocol) {
		t.Errorf("bad protocol: %v", err)
	}
}

// FuzzDecodeRequest: any slot contents decode without panic, and what an
// encoder writes back decodes to the same request.
func FuzzDecodeRequest(f *testing.F) {
	for _, b := range corpus.Files(f, "*.bin") {
		f.Add(b)
	}
	f.Add(make([]byte, 112))
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, p := range []Protocol{X86_32, X86_64} {
			if len(b) < p.RequestSize() {
				continue
			}
			var r, r2 Request
			p.DecodeRequest(b, &r)
			enc := make([]byte, p.RequestSize())
			p.EncodeRequest(enc, &r)
			p.DecodeRequest(enc, &r2)
			if r != r2 {
				t.Fatalf("%v: re-encode differs\n%+v\n%+v", p, r, r2)
			}
		}
	})
}
