package xen

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/blktap-go/blktap/internal/oracle"
	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/ring"
)

// guestRing is a test blkfront over a fakeXen: it owns the ring (its own
// contiguous view of scattered guest pages) and drives it.
type guestRing struct {
	t     *testing.T
	f     *fakeXen
	front *ring.Front
}

func newGuestRing(t *testing.T, f *fakeXen, pages []int, proto blkif.Protocol) *guestRing {
	t.Helper()
	view, err := mapPages(f.memfd, pages, 3) // PROT_READ|PROT_WRITE
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unmapPages(view) })
	front, err := ring.NewFront(view, proto)
	if err != nil {
		t.Fatal(err)
	}
	front.Init()
	return &guestRing{t: t, f: f, front: front}
}

// do pushes reqs, kicks when the ring asks for it, and returns one
// response per request, indexed by request id.
func (g *guestRing) do(reqs ...blkif.Request) map[uint64]blkif.Response {
	g.t.Helper()
	for i := range reqs {
		if err := g.front.Push(&reqs[i]); err != nil {
			g.t.Fatal(err)
		}
	}
	if g.front.PushRequests() {
		g.f.kick()
	}
	out := map[uint64]blkif.Response{}
	for len(out) < len(reqs) {
		n, err := g.front.Pending()
		if err != nil {
			g.t.Fatal(err)
		}
		for range n {
			var r blkif.Response
			g.front.Next(&r)
			out[r.ID] = r
		}
		if len(out) == len(reqs) {
			break
		}
		more, err := g.front.FinalCheck()
		if err != nil {
			g.t.Fatal(err)
		}
		if !more {
			g.f.waitIRQ()
		}
	}
	return out
}

func fill(p []byte, seed byte) {
	for i := range p {
		p[i] = seed + byte(i*7)
	}
}

// TestServeRoundTrip runs ring.Serve over the Xen transport on the fake
// device with a raw image: both ABIs, one- and four-page rings, with and
// without persistent grants; direct and indirect writes and reads, a
// flush, and requests naming bad refs. The bytes written are checked in
// the file with qemu-io, and the mapping lifetimes at the end.
func TestServeRoundTrip(t *testing.T) {
	for _, proto := range []blkif.Protocol{blkif.X86_64, blkif.X86_32} {
		for _, order := range []int{0, 2} {
			// maxPersistent -1: no persistent grants (grant copy); -2:
			// none, on a kernel without grant copy (map per request); 4: a
			// cache that overflows and evicts while serving; 0: the default.
			for _, maxPersistent := range []int{-1, -2, 4, 0} {
				name := fmt.Sprintf("%v/order%d/persistent=%d", proto, order, maxPersistent)
				t.Run(name, func(t *testing.T) { roundTrip(t, proto, order, maxPersistent) })
			}
		}
	}
}

func roundTrip(t *testing.T, proto blkif.Protocol, order int, maxPersistent int) {
	persistent := maxPersistent >= 0
	const (
		size      = 1 << 20
		dataPage  = 16 // guest pages 16.. hold data
		readPage  = 64 // and 64.. read buffers
		indPage   = 120
		nIndirect = 40
		roRef     = 900
	)
	f := newFakeXen(t, testDomid, 128)
	f.noCopy = maxPersistent == -2
	var ringPages []int
	for i := range 1 << order {
		ringPages = append(ringPages, 10-2*i) // scattered, descending
	}
	g := newGuestRing(t, f, ringPages, proto)
	refs := make([]uint32, len(ringPages))
	for i, p := range ringPages {
		refs[i] = uint32(500 + i)
		f.grant(refs[i], p, false)
	}
	// Data refs: ref 1000+p names guest page p.
	for p := dataPage; p < indPage+1; p++ {
		f.grant(uint32(1000+p), p, false)
	}
	f.grant(roRef, readPage, true)

	path, img := tempRaw(t, size)

	tr, err := Attach(f.device(), Options{Domid: testDomid, RingRefs: refs, EventChannel: f.remotePort, PersistentGrants: persistent, MaxPersistent: max(maxPersistent, 0)})
	if err != nil {
		t.Fatal(err)
	}
	x := tr.(*Transport)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	stats := new(ring.Stats)
	go func() {
		done <- ring.Serve(ctx, tr, proto, img, ring.Options{MaxIndirectSegments: 256, Stats: stats})
	}()
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Serve: %v", err)
			}
		}
	}
	defer func() { stop(); tr.Close() }()

	// Direct write of 11 pages at sector 8, then read them back.
	w := blkif.Request{Op: blkif.OpWrite, NrSegments: blkif.SegmentsMax, ID: 1, Sector: 8}
	r := blkif.Request{Op: blkif.OpRead, NrSegments: blkif.SegmentsMax, ID: 2, Sector: 8}
	for i := range blkif.SegmentsMax {
		fill(f.page(dataPage+i), byte(i))
		w.Seg[i] = blkif.Segment{Gref: uint32(1000 + dataPage + i), FirstSect: 0, LastSect: 7}
		r.Seg[i] = blkif.Segment{Gref: uint32(1000 + readPage + i), FirstSect: 0, LastSect: 7}
	}
	expectOK(t, g.do(w), 1)
	expectOK(t, g.do(r), 2)
	for i := range blkif.SegmentsMax {
		if !bytes.Equal(f.page(readPage+i), f.page(dataPage+i)) {
			t.Fatalf("segment %d read back differs", i)
		}
	}

	// An indirect write of nIndirect pages (segment list in guest page
	// indPage) right after the direct one, and a flush.
	ind := f.page(indPage)
	for i := range nIndirect {
		p := dataPage + i%48
		blkif.EncodeSegment(ind[i*blkif.SegmentSize:], &blkif.Segment{Gref: uint32(1000 + p), LastSect: 7})
	}
	iw := blkif.Request{Op: blkif.OpIndirect, IndirectOp: blkif.OpWrite, IndirectSegments: nIndirect,
		ID: 3, Sector: 8 + blkif.SegmentsMax*8}
	iw.IndirectGrefs[0] = 1000 + indPage
	fl := blkif.Request{Op: blkif.OpFlushDiskcache, ID: 4}
	expectOK(t, g.do(iw, fl), 3, 4)

	// Bad refs get an error for that request alone: ungranted, a read into
	// a read-only grant, the ring's own page, a ref of the wrong size.
	bad := func(id uint64, ref uint32, op uint8) blkif.Request {
		q := blkif.Request{Op: op, NrSegments: 1, ID: id, Sector: 0}
		q.Seg[0] = blkif.Segment{Gref: ref, LastSect: 7}
		return q
	}
	good := bad(14, 1000+readPage+20, blkif.OpRead)
	rsp := g.do(bad(10, 77777, blkif.OpWrite), bad(11, roRef, blkif.OpRead), bad(12, refs[0], blkif.OpRead),
		bad(13, 1000+readPage+21, blkif.OpRead), good)
	for id := uint64(10); id <= 12; id++ {
		if rsp[id].Status != blkif.StatusError {
			t.Errorf("request %d: status %d, want error", id, rsp[id].Status)
		}
	}
	expectOK(t, rsp, 13, 14)

	st := x.Stats()
	if persistent {
		// The read buffers of request 2 and the pages reused by the
		// indirect write were cache hits.
		if st.Hits == 0 || st.Persistent == 0 {
			t.Errorf("persistent grants never hit the cache: %+v", st)
		}
		if maxPersistent > 0 && (st.Persistent > maxPersistent || st.Evictions == 0) {
			t.Errorf("small cache (%d) did not bound or evict: %+v", maxPersistent, st)
		}
	} else if st.Persistent != 0 || st.Hits != 0 {
		t.Errorf("cache used without persistent grants: %+v", st)
	} else if copied := !f.noCopy; copied != x.Copying() || copied != (st.Copies > 0) || copied != (st.Maps == 0) {
		// Grant copy maps no data page at all; the fallback copies none.
		t.Errorf("grant copy %v (kernel has it: %v) but stats %+v", x.Copying(), copied, st)
	}
	stop()
	// Serve ended after a release point: only the ring and the
	// persistent cache stay mapped.
	if got, want := f.liveMappings(), len(ringPages)+x.Stats().Persistent; got != want {
		t.Errorf("%d pages mapped after Serve, want %d (ring + cache)", got, want)
	}
	if err := tr.Close(); err != nil {
		t.Fatal(err)
	}
	if f.liveMappings() != 0 {
		t.Fatalf("%d pages mapped after Close", f.liveMappings())
	}

	// The image holds what the guest wrote: 11 direct pages then the
	// indirect ones, checked by an independent reader.
	want := make([]byte, 0, (blkif.SegmentsMax+nIndirect)*pageSize)
	for i := range blkif.SegmentsMax {
		want = append(want, f.page(dataPage+i)...)
	}
	for i := range nIndirect {
		want = append(want, f.page(dataPage+i%48)...)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[8*512:8*512+len(want)], want) {
		t.Fatal("image contents differ from what the guest wrote")
	}
	// An independent reader agrees: the whole image equals a reference
	// holding exactly the guest's bytes at sector 8 and zeros elsewhere.
	qemuImg := oracle.Require(t, "qemu-img")
	ref := make([]byte, size)
	copy(ref[8*512:], want)
	refPath := filepath.Join(t.TempDir(), "want.raw")
	if err := os.WriteFile(refPath, ref, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(qemuImg, "compare", "-f", "raw", "-F", "raw", refPath, path).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare: %v\n%s", err, out)
	}
	// Writes 1, 3 and refused 10; reads 2, 11-14; 10-12 invalid.
	if s := stats; s.Writes.Load() != 3 || s.Reads.Load() != 5 || s.Indirects.Load() != 1 || s.Invalid.Load() != 3 {
		t.Errorf("ring stats: writes %d reads %d indirects %d invalid %d", s.Writes.Load(), s.Reads.Load(), s.Indirects.Load(), s.Invalid.Load())
	}
}

func expectOK(t *testing.T, rsp map[uint64]blkif.Response, ids ...uint64) {
	t.Helper()
	for _, id := range ids {
		r, ok := rsp[id]
		if !ok || r.Status != blkif.StatusOK {
			t.Fatalf("request %d: %+v (present %v)", id, r, ok)
		}
	}
}

// TestServeHostileOverXen: a frontend whose req_prod runs more than a ring
// ahead stops Serve with ring.ErrHostile (no hang), and the transport
// still tears down completely.
func TestServeHostileOverXen(t *testing.T) {
	f := newFakeXen(t, testDomid, 16)
	newGuestRing(t, f, []int{3}, blkif.X86_64) // initialises the ring
	f.grant(500, 3, false)
	tr, err := Attach(f.device(), Options{Domid: testDomid, RingRefs: []uint32{500}, EventChannel: f.remotePort})
	if err != nil {
		t.Fatal(err)
	}
	_, img := tempRaw(t, 1<<16)
	done := make(chan error, 1)
	go func() { done <- ring.Serve(context.Background(), tr, blkif.X86_64, img, ring.Options{}) }()
	// req_prod at offset 0 of the guest's ring page, far past a ring.
	ne.PutUint32(f.page(3)[blkif.OffReqProd:], 1000)
	f.kick()
	if err := <-done; !errors.Is(err, ring.ErrHostile) {
		t.Fatalf("Serve = %v, want ErrHostile", err)
	}
	if err := tr.Close(); err != nil {
		t.Fatal(err)
	}
	if bound, closed, _, _ := f.state(); f.liveMappings() != 0 || bound || !closed {
		t.Fatalf("after Close: %d mapped, bound %v, closed %v", f.liveMappings(), bound, closed)
	}
}
