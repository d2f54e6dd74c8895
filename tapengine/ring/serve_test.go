package ring

import (
	"bytes"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/image"

	"github.com/blktap-go/blktap/tapengine/blkif"
)

func seg(gref uint32, first, last uint8) blkif.Segment {
	return blkif.Segment{Gref: gref, FirstSect: first, LastSect: last}
}

func rw(op uint8, id, sector uint64, segs ...blkif.Segment) blkif.Request {
	r := blkif.Request{Op: op, ID: id, Sector: sector, NrSegments: uint8(len(segs))}
	copy(r.Seg[:], segs)
	return r
}

// TestServeReadWrite: the basic data path, both layouts, with a page
// split into several segments.
func TestServeReadWrite(t *testing.T) {
	for _, proto := range []blkif.Protocol{blkif.X86_32, blkif.X86_64} {
		t.Run(proto.String(), func(t *testing.T) {
			h := newHarness(t, proto, 0, 1<<20, Options{})
			src := h.tr.grant(10, true)
			for i := range src {
				src[i] = byte(i * 7)
			}
			h.tr.grant(11, true)
			copy(h.tr.pages[11], bytes.Repeat([]byte{0x5a}, 4096))
			rsp := h.do(rw(blkif.OpWrite, 1, 16, seg(10, 0, 7), seg(11, 2, 3)))
			if rsp[0] != (blkif.Response{ID: 1, Op: blkif.OpWrite, Status: blkif.StatusOK}) {
				t.Fatalf("write: %+v", rsp[0])
			}
			data, _, _ := h.img.snapshot()
			if !bytes.Equal(data[16*512:16*512+4096], src) || !bytes.Equal(data[24*512:26*512], bytes.Repeat([]byte{0x5a}, 1024)) {
				t.Fatal("image does not hold the write")
			}
			dst := h.tr.grant(12, false)
			rsp = h.do(rw(blkif.OpRead, 2, 17, seg(12, 1, 2)))
			if rsp[0].Status != blkif.StatusOK || !bytes.Equal(dst[512:1536], src[512:1536]) {
				t.Fatalf("read: %+v", rsp[0])
			}
			rsp = h.do(blkif.Request{Op: blkif.OpFlushDiskcache, ID: 3})
			if _, fl, _ := h.img.snapshot(); rsp[0].Status != blkif.StatusOK || fl != 1 {
				t.Fatalf("flush: %+v, %d flushes", rsp[0], fl)
			}
			rsp = h.do(rw(blkif.OpWriteBarrier, 4, 0, seg(10, 0, 0)))
			if _, fl, _ := h.img.snapshot(); rsp[0].Status != blkif.StatusOK || fl != 3 {
				t.Fatalf("barrier: %+v, %d flushes", rsp[0], fl)
			}
		})
	}
}

// TestHostileRequests: every bad request a guest can write (docs/ARCHITECTURE.md, section "Trust") gets an error
// response for that request alone, touches nothing, and the ring goes on.
func TestHostileRequests(t *testing.T) {
	const size = 64 * 512
	cases := []struct {
		name string
		opts Options
		req  blkif.Request
		want int16
	}{
		{"op reserved_1", Options{}, blkif.Request{Op: blkif.OpReserved1, ID: 9}, blkif.StatusEOPNOTSUPP},
		{"op 7", Options{}, blkif.Request{Op: 7, ID: 9}, blkif.StatusEOPNOTSUPP},
		{"op 255", Options{}, blkif.Request{Op: 255, ID: 9}, blkif.StatusEOPNOTSUPP},
		{"read nr_segments 0", Options{}, rw(blkif.OpRead, 9, 0), blkif.StatusError},
		{"write nr_segments 0", Options{}, rw(blkif.OpWrite, 9, 0), blkif.StatusError},
		{"nr_segments 12", Options{}, blkif.Request{Op: blkif.OpWrite, ID: 9, NrSegments: 12}, blkif.StatusError},
		{"nr_segments 255", Options{}, blkif.Request{Op: blkif.OpRead, ID: 9, NrSegments: 255}, blkif.StatusError},
		{"first > last", Options{}, rw(blkif.OpWrite, 9, 0, seg(10, 0, 7), seg(10, 3, 2)), blkif.StatusError},
		{"last_sect 8", Options{}, rw(blkif.OpWrite, 9, 0, seg(10, 0, 8)), blkif.StatusError},
		{"last_sect 255", Options{}, rw(blkif.OpRead, 9, 0, seg(11, 255, 255)), blkif.StatusError},
		{"past the end", Options{}, rw(blkif.OpWrite, 9, 60, seg(10, 0, 7)), blkif.StatusError},
		{"sector overflow", Options{}, rw(blkif.OpWrite, 9, 1<<63, seg(10, 0, 7)), blkif.StatusError},
		{"sector max", Options{}, rw(blkif.OpRead, 9, ^uint64(0), seg(11, 0, 0)), blkif.StatusError},
		{"write read-only disk", Options{ReadOnly: true}, rw(blkif.OpWrite, 9, 0, seg(10, 0, 0)), blkif.StatusError},
		{"barrier read-only disk", Options{ReadOnly: true}, rw(blkif.OpWriteBarrier, 9, 0, seg(10, 0, 0)), blkif.StatusError},
		{"ungranted page", Options{}, rw(blkif.OpWrite, 9, 0, seg(10, 0, 7), seg(99, 0, 7)), blkif.StatusError},
		{"read into read-only page", Options{}, rw(blkif.OpRead, 9, 0, seg(10, 0, 7)), blkif.StatusError},
		{"discard disabled", Options{}, blkif.Request{Op: blkif.OpDiscard, ID: 9, NrSectors: 1}, blkif.StatusEOPNOTSUPP},
		{"secure discard", Options{Discard: true}, blkif.Request{Op: blkif.OpDiscard, Flag: blkif.DiscardSecure, ID: 9, NrSectors: 1}, blkif.StatusEOPNOTSUPP},
		{"discard past the end", Options{Discard: true}, blkif.Request{Op: blkif.OpDiscard, ID: 9, Sector: 60, NrSectors: 5}, blkif.StatusError},
		{"discard huge", Options{Discard: true}, blkif.Request{Op: blkif.OpDiscard, ID: 9, Sector: 1, NrSectors: ^uint64(0)}, blkif.StatusError},
		{"discard read-only", Options{Discard: true, ReadOnly: true}, blkif.Request{Op: blkif.OpDiscard, ID: 9, NrSectors: 1}, blkif.StatusError},
		{"indirect disabled", Options{}, blkif.Request{Op: blkif.OpIndirect, IndirectOp: blkif.OpRead, IndirectSegments: 1, ID: 9}, blkif.StatusEOPNOTSUPP},
		{"indirect 0 segments", Options{MaxIndirectSegments: 256}, blkif.Request{Op: blkif.OpIndirect, IndirectOp: blkif.OpWrite, ID: 9, IndirectGrefs: [8]uint32{20}}, blkif.StatusError},
		{"indirect too many", Options{MaxIndirectSegments: 256}, blkif.Request{Op: blkif.OpIndirect, IndirectOp: blkif.OpWrite, IndirectSegments: 257, ID: 9, IndirectGrefs: [8]uint32{20}}, blkif.StatusError},
		{"indirect flush", Options{MaxIndirectSegments: 256}, blkif.Request{Op: blkif.OpIndirect, IndirectOp: blkif.OpFlushDiskcache, IndirectSegments: 1, ID: 9, IndirectGrefs: [8]uint32{20}}, blkif.StatusError},
		{"indirect ungranted", Options{MaxIndirectSegments: 256}, blkif.Request{Op: blkif.OpIndirect, IndirectOp: blkif.OpWrite, IndirectSegments: 1, ID: 9, IndirectGrefs: [8]uint32{98}}, blkif.StatusError},
		{"indirect bad segment", Options{MaxIndirectSegments: 256}, blkif.Request{Op: blkif.OpIndirect, IndirectOp: blkif.OpWrite, IndirectSegments: 3, ID: 9, IndirectGrefs: [8]uint32{21}}, blkif.StatusError},
	}
	for _, proto := range []blkif.Protocol{blkif.X86_32, blkif.X86_64} {
		for _, c := range cases {
			t.Run(proto.String()+"/"+c.name, func(t *testing.T) {
				h := newHarness(t, proto, 0, size, c.opts)
				copy(h.tr.grant(10, true), bytes.Repeat([]byte{0xee}, 4096))
				h.tr.grant(11, false)
				h.tr.grant(20, true) // indirect page: zeroed segments -> gref 0, ungranted
				ind := h.tr.grant(21, true)
				blkif.EncodeSegment(ind[0:], &blkif.Segment{Gref: 10, FirstSect: 0, LastSect: 7})
				blkif.EncodeSegment(ind[8:], &blkif.Segment{Gref: 10, FirstSect: 0, LastSect: 7})
				blkif.EncodeSegment(ind[16:], &blkif.Segment{Gref: 10, FirstSect: 5, LastSect: 4})
				rsp := h.do(c.req)
				wantOp := c.req.Op
				if c.req.Op == blkif.OpIndirect && (c.req.IndirectOp == blkif.OpRead || c.req.IndirectOp == blkif.OpWrite) && c.opts.MaxIndirectSegments > 0 {
					wantOp = c.req.IndirectOp
				}
				if rsp[0] != (blkif.Response{ID: 9, Op: wantOp, Status: c.want}) {
					t.Errorf("response %+v, want status %d op %d", rsp[0], c.want, wantOp)
				}
				if data, _, disc := h.img.snapshot(); !bytes.Equal(data, make([]byte, size)) || disc != 0 {
					t.Error("a refused request touched the image")
				}
				// The ring goes on: a good request still works.
				h.tr.grant(12, false)
				if rsp := h.do(rw(blkif.OpRead, 10, 0, seg(12, 0, 7))); rsp[0].Status != blkif.StatusOK {
					t.Errorf("next request: %+v", rsp[0])
				}
				if err := shutdown(h); err != nil {
					t.Errorf("Serve: %v", err)
				}
			})
		}
	}
}

func shutdown(h *harness) error {
	h.stop()
	h.stop = nil
	return <-h.done
}

// TestProducerTooFarAhead: a req_prod more than a ring ahead (or behind)
// stops the ring with ErrHostile.
func TestProducerTooFarAhead(t *testing.T) {
	for _, prod := range []uint32{33, 1000, 1 << 31, ^uint32(0)} {
		t.Run(fmt.Sprint(prod), func(t *testing.T) {
			h := newHarness(t, blkif.X86_64, 0, 4096, Options{})
			store32(h.tr.ring, blkif.OffReqProd, prod)
			h.tr.kickBackend()
			err := <-h.done
			h.stop()
			h.stop = nil
			if !errors.Is(err, ErrHostile) {
				t.Fatalf("Serve returned %v, want ErrHostile", err)
			}
			t.Log(err)
		})
	}
	// Exactly a ring ahead is legal.
	h := newHarness(t, blkif.X86_64, 0, 4096, Options{})
	reqs := make([]blkif.Request, 32)
	for i := range reqs {
		reqs[i] = blkif.Request{Op: blkif.OpFlushDiskcache, ID: uint64(i)}
	}
	if rsp := h.do(reqs...); len(rsp) != 32 {
		t.Fatalf("%d responses", len(rsp))
	}
}

// TestIndirect: a 300-segment indirect write and read back, spanning two
// indirect pages.
func TestIndirect(t *testing.T) {
	for _, proto := range []blkif.Protocol{blkif.X86_32, blkif.X86_64} {
		t.Run(proto.String(), func(t *testing.T) {
			const n = 600
			h := newHarness(t, proto, 0, n*4096+4096, Options{MaxIndirectSegments: 4096})
			ind0, ind1 := h.tr.grant(5000, true), h.tr.grant(5001, true)
			for i := range n {
				page := h.tr.grant(uint32(100+i), true)
				for j := range page {
					page[j] = byte(i + j)
				}
				b := ind0
				k := i
				if i >= 512 {
					b, k = ind1, i-512
				}
				blkif.EncodeSegment(b[k*8:], &blkif.Segment{Gref: uint32(100 + i), FirstSect: 0, LastSect: 7})
			}
			req := blkif.Request{Op: blkif.OpIndirect, IndirectOp: blkif.OpWrite, IndirectSegments: n, ID: 77, Sector: 8,
				IndirectGrefs: [8]uint32{5000, 5001}}
			if rsp := h.do(req); rsp[0] != (blkif.Response{ID: 77, Op: blkif.OpWrite}) {
				t.Fatalf("indirect write: %+v", rsp[0])
			}
			data, _, _ := h.img.snapshot()
			for i := range n {
				if !bytes.Equal(data[4096+i*4096:4096+(i+1)*4096], h.tr.pages[uint32(100+i)]) {
					t.Fatalf("page %d not written", i)
				}
			}
			// Read it back into fresh writable pages.
			for i := range n {
				clear(h.tr.grant(uint32(100+i), false))
			}
			req.IndirectOp = blkif.OpRead
			if rsp := h.do(req); rsp[0] != (blkif.Response{ID: 77, Op: blkif.OpRead}) {
				t.Fatalf("indirect read: %+v", rsp[0])
			}
			if !bytes.Equal(h.tr.pages[uint32(100+n-1)], data[n*4096:]) {
				t.Fatal("indirect read data")
			}
		})
	}
}

func TestDiscard(t *testing.T) {
	h := newHarness(t, blkif.X86_64, 0, 8192, Options{Discard: true})
	h.img.WriteAt(bytes.Repeat([]byte{1}, 8192), 0)
	rsp := h.do(blkif.Request{Op: blkif.OpDiscard, ID: 1, Sector: 2, NrSectors: 3})
	if rsp[0] != (blkif.Response{ID: 1, Op: blkif.OpDiscard}) {
		t.Fatalf("%+v", rsp[0])
	}
	if data, _, _ := h.img.snapshot(); data[1023] != 1 || data[1024] != 0 || data[2559] != 0 || data[2560] != 1 {
		t.Fatal("discard range wrong")
	}
}

// TestWorkersOrdering: with a worker pool, a batch of writes, a flush and
// reads all complete, and every request in the batch is answered.
func TestWorkersBatch(t *testing.T) {
	h := newHarness(t, blkif.X86_64, 0, 1<<20, Options{Workers: 4})
	var reqs []blkif.Request
	for i := range 16 {
		copy(h.tr.grant(uint32(100+i), true), bytes.Repeat([]byte{byte(i + 1)}, 4096))
		reqs = append(reqs, rw(blkif.OpWrite, uint64(i), uint64(i*8), seg(uint32(100+i), 0, 7)))
	}
	reqs = append(reqs, blkif.Request{Op: blkif.OpFlushDiskcache, ID: 16})
	for i := range 15 {
		h.tr.grant(uint32(200+i), false)
		reqs = append(reqs, rw(blkif.OpRead, uint64(17+i), uint64(i*8), seg(uint32(200+i), 0, 7)))
	}
	rsp := h.do(reqs...)
	seen := map[uint64]bool{}
	for _, r := range rsp {
		if r.Status != blkif.StatusOK || seen[r.ID] {
			t.Fatalf("%+v", r)
		}
		seen[r.ID] = true
	}
	for i := range 15 {
		if h.tr.pages[uint32(200+i)][100] != byte(i+1) {
			t.Fatalf("read %d", i)
		}
	}
}

// TestResume: a second Serve on the same ring carries on where the first
// stopped.
func TestResume(t *testing.T) {
	h := newHarness(t, blkif.X86_32, 0, 8192, Options{})
	for i := range 40 {
		if rsp := h.do(blkif.Request{Op: blkif.OpFlushDiskcache, ID: uint64(i)}); rsp[0].ID != uint64(i) {
			t.Fatal(rsp)
		}
	}
	if err := shutdown(h); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := contextWithCancel()
	h.done = make(chan error, 1)
	h.stop = cancel
	go func() { h.done <- Serve(ctx, h.tr, blkif.X86_32, h.img, Options{}) }()
	for i := range 40 {
		if rsp := h.do(blkif.Request{Op: blkif.OpFlushDiskcache, ID: uint64(100 + i)}); rsp[0].ID != uint64(100+i) {
			t.Fatal(rsp)
		}
	}
}

func TestFeatures(t *testing.T) {
	probe, connect := Options{}.Features()
	if fmt.Sprint(probe) != "[[max-ring-page-order 4]]" || fmt.Sprint(connect) != "[[feature-flush-cache 1] [feature-barrier 1]]" {
		t.Errorf("plain: %v %v", probe, connect)
	}
	probe, connect = Options{Discard: true, MaxIndirectSegments: 256}.Features()
	if fmt.Sprint(probe) != "[[max-ring-page-order 4] [feature-max-indirect-segments 256]]" ||
		fmt.Sprint(connect) != "[[feature-flush-cache 1] [feature-barrier 1] [feature-discard 1] [discard-granularity 512] [discard-alignment 0] [discard-secure 0]]" {
		t.Errorf("full: %v %v", probe, connect)
	}
}

// stallImage blocks the read at offset at until release is closed.
type stallImage struct {
	*memImage
	at      int64
	entered chan struct{}
	release chan struct{}
}

func (s *stallImage) ReadAt(p []byte, off int64) (int, error) {
	if off == s.at {
		close(s.entered)
		<-s.release
	}
	return s.memImage.ReadAt(p, off)
}

// serveImage runs Serve on tr (x86_64) for img until the test ends and
// returns the frontend's side of the ring.
func serveImage(t *testing.T, tr *memTransport, img image.Image) *Front {
	t.Helper()
	front, err := NewFront(tr.ring, blkif.X86_64)
	if err != nil {
		t.Fatal(err)
	}
	front.Init()
	ctx, cancel := contextWithCancel()
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, tr, blkif.X86_64, img, Options{}) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return front
}

// TestPublishMidBatch: a long batch publishes its first responses while
// it still works on the rest, so the frontend can take them meanwhile.
func TestPublishMidBatch(t *testing.T) {
	tr := newMemTransport(t, 0)
	img := &stallImage{memImage: &memImage{data: make([]byte, 1<<20)}, at: publishEvery * 4096,
		entered: make(chan struct{}), release: make(chan struct{})}
	front := serveImage(t, tr, img)
	const n = publishEvery + 4
	for i := range n {
		tr.grant(uint32(100+i), false)
		r := rw(blkif.OpRead, uint64(i), uint64(i)*8, seg(uint32(100+i), 0, 7))
		if err := front.Push(&r); err != nil {
			t.Fatal(err)
		}
	}
	if front.PushRequests() {
		tr.kickBackend()
	}
	<-img.entered
	got, err := front.Pending()
	if err != nil {
		t.Fatal(err)
	}
	if got != publishEvery {
		t.Errorf("%d responses published while the batch stalls at request %d, want %d", got, publishEvery, publishEvery)
	}
	close(img.release)
	seen := 0
	for seen < n {
		k, err := front.Pending()
		if err != nil {
			t.Fatal(err)
		}
		for range k {
			var rsp blkif.Response
			front.Next(&rsp)
			if rsp.Status != blkif.StatusOK {
				t.Errorf("response %+v", rsp)
			}
			seen++
		}
		if seen < n {
			if more, _ := front.FinalCheck(); !more {
				tr.waitNotify()
			}
		}
	}
}

// grantRun grants refs first..first+n-1 as one run of adjacent memory,
// as the local frontend's memfd lays a request's pages out.
func (m *memTransport) grantRun(first uint32, n int) []byte {
	run, err := unix.Mmap(-1, 0, n*blkif.PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		panic(err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := range n {
		m.pages[first+uint32(i)] = run[i*blkif.PageSize : (i+1)*blkif.PageSize : (i+1)*blkif.PageSize]
		m.ro[first+uint32(i)] = false
	}
	return run
}

// countImage counts the calls that reach the image.
type countImage struct {
	*memImage
	reads, writes atomic.Int32
}

func (c *countImage) ReadAt(p []byte, off int64) (int, error) {
	c.reads.Add(1)
	return c.memImage.ReadAt(p, off)
}

func (c *countImage) WriteAt(p []byte, off int64) (int, error) {
	c.writes.Add(1)
	return c.memImage.WriteAt(p, off)
}

// TestMergeAdjacentSegments: segments whose pages follow each other in
// memory reach the image as one call (a partial page included, when the
// next segment continues it), others one call each, and the bytes land
// where the segments say either way.
func TestMergeAdjacentSegments(t *testing.T) {
	tr := newMemTransport(t, 0)
	img := &countImage{memImage: &memImage{data: make([]byte, 1<<20)}}
	front := serveImage(t, tr, img)
	run := tr.grantRun(200, 4)
	for i := range run {
		run[i] = byte(i * 31 / 7)
	}
	other := tr.grant(300, false)
	for i := range other {
		other[i] = 0xee
	}
	h := &harness{t: t, tr: tr, front: front}
	// 200 (two halves: one page), 201, 202, 203, then 300: two calls.
	rsp := h.do(rw(blkif.OpWrite, 1, 8, seg(200, 0, 3), seg(200, 4, 7), seg(201, 0, 7), seg(202, 0, 7), seg(203, 0, 7), seg(300, 0, 7)))
	if rsp[0].Status != blkif.StatusOK {
		t.Fatalf("write: %+v", rsp[0])
	}
	if n := img.writes.Load(); n != 2 {
		t.Errorf("%d image writes for 5 adjacent pages and 1 apart, want 2", n)
	}
	data, _, _ := img.snapshot()
	if !bytes.Equal(data[4096:4096+len(run)], run) || !bytes.Equal(data[4096+len(run):4096+len(run)+4096], other) {
		t.Fatal("merged write put the bytes in the wrong place")
	}
	// Out of memory order (203 before 202): no merge across the swap, and
	// the read still fills each page from its own disk offset.
	clear(run)
	rsp = h.do(rw(blkif.OpRead, 2, 8, seg(200, 0, 7), seg(201, 0, 7), seg(203, 0, 7), seg(202, 0, 7)))
	if rsp[0].Status != blkif.StatusOK {
		t.Fatalf("read: %+v", rsp[0])
	}
	if n := img.reads.Load(); n != 3 {
		t.Errorf("%d image reads, want 3 (200+201, 203, 202)", n)
	}
	if !bytes.Equal(run[:8192], data[4096:4096+8192]) || !bytes.Equal(run[3*4096:], data[4096+2*4096:4096+3*4096]) ||
		!bytes.Equal(run[2*4096:3*4096], data[4096+3*4096:4096+4*4096]) {
		t.Fatal("read of swapped pages filled the wrong bytes")
	}
}

// noDiscardImage is an image whose Discard reports the operation
// missing, as raw does on a file system without hole punching.
type noDiscardImage struct {
	*memImage
	err error
}

func (n *noDiscardImage) Discard(off, length int64) error { return n.err }

// TestDiscardUnsupported: a discard the image cannot do answers
// EOPNOTSUPP, which makes Linux blkfront stop sending them; any other
// failure stays an I/O error (docs/WIRE.md, section "blkif requests").
func TestDiscardUnsupported(t *testing.T) {
	for _, c := range []struct {
		name string
		err  error
		want int16
	}{
		{"image", fmt.Errorf("raw: x: discard: %w: %w", image.ErrUnsupported, unix.EOPNOTSUPP), blkif.StatusEOPNOTSUPP},
		{"errors", fmt.Errorf("nbd: %w", errors.ErrUnsupported), blkif.StatusEOPNOTSUPP},
		{"io", fmt.Errorf("discard: %w", unix.EIO), blkif.StatusError},
	} {
		t.Run(c.name, func(t *testing.T) {
			tr := newMemTransport(t, 0)
			front, err := NewFront(tr.ring, blkif.X86_64)
			if err != nil {
				t.Fatal(err)
			}
			front.Init()
			r := blkif.Request{Op: blkif.OpDiscard, ID: 7, Sector: 2, NrSectors: 3}
			if err := front.Push(&r); err != nil {
				t.Fatal(err)
			}
			front.PushRequests()
			stats := new(Stats)
			img := &noDiscardImage{memImage: &memImage{data: make([]byte, 8192)}, err: c.err}
			s, err := newServer(tr, blkif.X86_64, img, Options{Discard: true, Stats: stats})
			if err != nil {
				t.Fatal(err)
			}
			defer s.close()
			if err := s.drain(); err != nil {
				t.Fatal(err)
			}
			var rsp blkif.Response
			front.Next(&rsp)
			if rsp != (blkif.Response{ID: 7, Op: blkif.OpDiscard, Status: c.want}) {
				t.Errorf("response %+v, want status %d", rsp, c.want)
			}
			if got, want := stats.Unsupported.Load(), uint64(map[bool]int{true: 1}[c.want == blkif.StatusEOPNOTSUPP]); got != want {
				t.Errorf("Unsupported %d, want %d", got, want)
			}
			if stats.Errors.Load() != 1 {
				t.Errorf("Errors %d, want 1", stats.Errors.Load())
			}
		})
	}
}
