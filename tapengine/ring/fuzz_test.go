package ring

import (
	"errors"
	"flag"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/blktap-go/blktap/internal/corpus"
	"github.com/blktap-go/blktap/tapengine/blkif"
)

var rewrite = flag.Bool("rewrite", false, "rewrite testdata/seeds")

// Seed layout: byte 0 = protocol (even x86_32, odd x86_64), byte 1 = flags
// (bit0 read-only, bit1 discard, bit2 indirect, bit3 a Copier transport), bytes 2..5 = req_prod,
// 6..9 = rsp_prod (where a previous backend stopped), then the ring slots.
const seedHeader = 10

func seedRing(proto blkif.Protocol, flags byte, prod uint32, reqs ...blkif.Request) []byte {
	b := make([]byte, seedHeader+len(reqs)*proto.SlotSize())
	if proto != blkif.X86_32 {
		b[0] = 1
	}
	b[1] = flags
	le32(b[2:], prod)
	for i := range reqs {
		proto.EncodeRequest(b[seedHeader+i*proto.SlotSize():], &reqs[i])
	}
	return b
}

func le32(b []byte, v uint32) { b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24) }
func get32(b []byte) uint32 {
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}

// seeds are named for what they hold; bad ones for their fault.
func seeds() map[string][]byte {
	w := rw(blkif.OpWrite, 1, 0, seg(1, 0, 7), seg(2, 0, 7))
	r := rw(blkif.OpRead, 2, 8, seg(3, 0, 7))
	return map[string][]byte{
		"write-read-flush-x86_64":       seedRing(blkif.X86_64, 0, 3, w, r, blkif.Request{Op: blkif.OpFlushDiskcache, ID: 3}),
		"write-read-x86_32":             seedRing(blkif.X86_32, 0, 2, w, r),
		"discard-and-secure":            seedRing(blkif.X86_64, 2, 2, blkif.Request{Op: blkif.OpDiscard, ID: 1, NrSectors: 8}, blkif.Request{Op: blkif.OpDiscard, Flag: 1, ID: 2, NrSectors: 8}),
		"indirect-write":                seedRing(blkif.X86_64, 4, 1, blkif.Request{Op: blkif.OpIndirect, IndirectOp: blkif.OpWrite, IndirectSegments: 2, ID: 5, IndirectGrefs: [8]uint32{4}}),
		"bad-nr-segments-12":            seedRing(blkif.X86_64, 0, 1, blkif.Request{Op: blkif.OpWrite, NrSegments: 12, ID: 1}),
		"bad-last-sect-8":               seedRing(blkif.X86_32, 0, 1, rw(blkif.OpWrite, 1, 0, seg(1, 0, 8))),
		"bad-write-read-only":           seedRing(blkif.X86_64, 1, 1, w),
		"bad-ungranted-page":            seedRing(blkif.X86_64, 0, 1, rw(blkif.OpRead, 1, 0, seg(77, 0, 7))),
		"bad-read-into-read-only-grant": seedRing(blkif.X86_64, 0, 1, rw(blkif.OpRead, 1, 0, seg(5, 0, 7))),
		"bad-past-the-end":              seedRing(blkif.X86_64, 0, 1, rw(blkif.OpRead, 1, 1<<40, seg(1, 0, 7))),
		"bad-prod-too-far-ahead":        seedRing(blkif.X86_64, 0, 33, w),
		"bad-op-reserved":               seedRing(blkif.X86_32, 0, 1, blkif.Request{Op: blkif.OpReserved1, ID: 1}),
		"copy-write-read-flush":         seedRing(blkif.X86_64, 8, 3, w, r, blkif.Request{Op: blkif.OpFlushDiskcache, ID: 3}),
		"copy-indirect-write":           seedRing(blkif.X86_64, 12, 1, blkif.Request{Op: blkif.OpIndirect, IndirectOp: blkif.OpWrite, IndirectSegments: 2, ID: 5, IndirectGrefs: [8]uint32{4}}),
		"copy-bad-read-into-read-only":  seedRing(blkif.X86_64, 8, 2, rw(blkif.OpRead, 1, 0, seg(5, 0, 7)), rw(blkif.OpRead, 2, 0, seg(2, 1, 3), seg(77, 0, 7))),
	}
}

func TestWriteSeeds(t *testing.T) {
	if !*rewrite {
		t.Skip("use -rewrite to regenerate testdata/seeds")
	}
	dir := filepath.Join("testdata", "seeds")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, b := range seeds() {
		if err := os.WriteFile(filepath.Join(dir, name+".ring"), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// FuzzServeRing puts arbitrary bytes in the ring as a frontend would and
// runs one drain of the backend: it must not panic or hang, and must
// either answer every request it consumed or stop with ErrHostile.
func FuzzServeRing(f *testing.F) {
	for _, b := range corpus.Files(f, "seeds/*.ring") {
		f.Add(b)
	}
	for _, b := range seeds() {
		f.Add(b)
	}
	quiet := slog.New(slog.DiscardHandler)
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < seedHeader {
			return
		}
		proto := blkif.X86_32
		if b[0]&1 != 0 {
			proto = blkif.X86_64
		}
		order := int(b[0]>>1) % 3
		tr := newMemTransport(t, order)
		copy(tr.ring[blkif.RingHeaderSize:], b[seedHeader:])
		prod, rspProd := get32(b[2:]), get32(b[6:])
		store32(tr.ring, blkif.OffReqProd, prod)
		store32(tr.ring, blkif.OffRspProd, rspProd)
		for ref := uint32(1); ref <= 4; ref++ {
			tr.grant(ref, false)
		}
		tr.grant(5, true)
		img := &memImage{data: make([]byte, 64<<10)}
		opts := Options{ReadOnly: b[1]&1 != 0, Discard: b[1]&2 != 0, Logger: quiet}
		if b[1]&4 != 0 {
			opts.MaxIndirectSegments = 256
		}
		var via Transport = tr
		if b[1]&8 != 0 {
			via = copyTransport{tr} // data by copy, as Xen's grant copy
		}
		s, err := newServer(via, proto, img, opts)
		if err != nil {
			t.Fatal(err)
		}
		defer s.close()
		err = s.drain()
		switch {
		case errors.Is(err, ErrHostile):
			if prod-rspProd <= uint32(s.back.Entries()) {
				t.Fatalf("hostile with prod %d rsp_prod %d: %v", prod, rspProd, err)
			}
		case err != nil:
			t.Fatal(err)
		default:
			if got := load32(tr.ring, blkif.OffRspProd); got != prod {
				t.Fatalf("rsp_prod %d after drain, req_prod %d", got, prod)
			}
			if got := load32(tr.ring, blkif.OffReqEvent); got != prod+1 {
				t.Fatalf("req_event %d after drain, want %d", got, prod+1)
			}
		}
	})
}
