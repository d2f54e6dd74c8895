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

// Guest page layout of roundTrip's fake guest.
const (
	rtSize      = 1 << 20
	rtDataPage  = 16 // guest pages 16.. hold data
	rtReadPage  = 64 // and 64.. read buffers
	rtIndPage   = 120
	rtNIndirect = 40
	rtRORef     = 900
)

// rtRig is roundTrip's fake Xen, guest, image and serving transport.
type rtRig struct {
	f         *fakeXen
	g         *guestRing
	ringPages []int
	refs      []uint32
	path      string
	x         *Transport
	stats     *ring.Stats
	stop      func()
}

func roundTrip(t *testing.T, proto blkif.Protocol, order int, maxPersistent int) {
	r := newRTRig(t, proto, order, maxPersistent)
	rtDirectAndIndirect(t, r)
	rtBadRefs(t, r)
	rtCheckCache(t, r, maxPersistent)
	r.stop()
	rtCheckMappings(t, r)
	rtCheckImage(t, r)
	// Writes 1, 3 and refused 10; reads 2, 11-14; 10-12 invalid.
	if s := r.stats; s.Writes.Load() != 3 || s.Reads.Load() != 5 || s.Indirects.Load() != 1 || s.Invalid.Load() != 3 {
		t.Errorf("ring stats: writes %d reads %d indirects %d invalid %d", s.Writes.Load(), s.Reads.Load(), s.Indirects.Load(), s.Invalid.Load())
	}
}

// newRTRig grants a ring of 2^order scattered pages and the data pages
// (ref 1000+p names guest page p; rtRORef a read-only one), and serves a
// fresh raw image on it; maxPersistent -1: no persistent grants, -2: no
// persistent grants and a kernel without grant copy.
func newRTRig(t *testing.T, proto blkif.Protocol, order int, maxPersistent int) *rtRig {
	f := newFakeXen(t, testDomid, 128)
	f.noCopy = maxPersistent == -2
	r := &rtRig{f: f, stats: new(ring.Stats)}
	for i := range 1 << order {
		r.ringPages = append(r.ringPages, 10-2*i) // scattered, descending
	}
	r.g = newGuestRing(t, f, r.ringPages, proto)
	r.refs = make([]uint32, len(r.ringPages))
	for i, p := range r.ringPages {
		r.refs[i] = uint32(500 + i)
		f.grant(r.refs[i], p, false)
	}
	for p := rtDataPage; p < rtIndPage+1; p++ {
		f.grant(uint32(1000+p), p, false)
	}
	f.grant(rtRORef, rtReadPage, true)
	path, img := tempRaw(t, rtSize)
	r.path = path
	tr, err := Attach(f.device(), Options{Domid: testDomid, RingRefs: r.refs, EventChannel: f.remotePort, PersistentGrants: maxPersistent >= 0, MaxPersistent: max(maxPersistent, 0)})
	if err != nil {
		t.Fatal(err)
	}
	r.x = tr.(*Transport)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- ring.Serve(ctx, tr, proto, img, ring.Options{MaxIndirectSegments: 256, Stats: r.stats})
	}()
	stopped := false
	r.stop = func() {
		if !stopped {
			stopped = true
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Serve: %v", err)
			}
		}
	}
	t.Cleanup(func() { r.stop(); tr.Close() })
	return r
}

// rtDirectAndIndirect: a direct write of 11 pages at sector 8, read back;
// then an indirect write of rtNIndirect pages (segment list in guest page
// rtIndPage) right after it, and a flush.
func rtDirectAndIndirect(t *testing.T, r *rtRig) {
	f := r.f
	w := blkif.Request{Op: blkif.OpWrite, NrSegments: blkif.SegmentsMax, ID: 1, Sector: 8}
	rd := blkif.Request{Op: blkif.OpRead, NrSegments: blkif.SegmentsMax, ID: 2, Sector: 8}
	for i := range blkif.SegmentsMax {
		fill(f.page(rtDataPage+i), byte(i))
		w.Seg[i] = blkif.Segment{Gref: uint32(1000 + rtDataPage + i), FirstSect: 0, LastSect: 7}
		rd.Seg[i] = blkif.Segment{Gref: uint32(1000 + rtReadPage + i), FirstSect: 0, LastSect: 7}
	}
	expectOK(t, r.g.do(w), 1)
	expectOK(t, r.g.do(rd), 2)
	for i := range blkif.SegmentsMax {
		if !bytes.Equal(f.page(rtReadPage+i), f.page(rtDataPage+i)) {
			t.Fatalf("segment %d read back differs", i)
		}
	}
	ind := f.page(rtIndPage)
	for i := range rtNIndirect {
		p := rtDataPage + i%48
		blkif.EncodeSegment(ind[i*blkif.SegmentSize:], &blkif.Segment{Gref: uint32(1000 + p), LastSect: 7})
	}
	iw := blkif.Request{Op: blkif.OpIndirect, IndirectOp: blkif.OpWrite, IndirectSegments: rtNIndirect,
		ID: 3, Sector: 8 + blkif.SegmentsMax*8}
	iw.IndirectGrefs[0] = 1000 + rtIndPage
	fl := blkif.Request{Op: blkif.OpFlushDiskcache, ID: 4}
	expectOK(t, r.g.do(iw, fl), 3, 4)
}

// rtBadRefs: bad refs get an error for that request alone: ungranted, a
// read into a read-only grant, the ring's own page, a ref of the wrong size.
func rtBadRefs(t *testing.T, r *rtRig) {
	bad := func(id uint64, ref uint32, op uint8) blkif.Request {
		q := blkif.Request{Op: op, NrSegments: 1, ID: id, Sector: 0}
		q.Seg[0] = blkif.Segment{Gref: ref, LastSect: 7}
		return q
	}
	good := bad(14, 1000+rtReadPage+20, blkif.OpRead)
	rsp := r.g.do(bad(10, 77777, blkif.OpWrite), bad(11, rtRORef, blkif.OpRead), bad(12, r.refs[0], blkif.OpRead),
		bad(13, 1000+rtReadPage+21, blkif.OpRead), good)
	for id := uint64(10); id <= 12; id++ {
		if rsp[id].Status != blkif.StatusError {
			t.Errorf("request %d: status %d, want error", id, rsp[id].Status)
		}
	}
	expectOK(t, rsp, 13, 14)
}

// rtCheckCache: persistent grants hit (and a small cache evicts); without
// them nothing is cached, and grant copy maps no data page at all while
// the fallback copies none.
func rtCheckCache(t *testing.T, r *rtRig, maxPersistent int) {
	st := r.x.Stats()
	if maxPersistent >= 0 {
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
	} else if copied := !r.f.noCopy; copied != r.x.Copying() || copied != (st.Copies > 0) || copied != (st.Maps == 0) {
		t.Errorf("grant copy %v (kernel has it: %v) but stats %+v", r.x.Copying(), copied, st)
	}
}

// rtCheckMappings: Serve ended after a release point, so only the ring and
// the persistent cache stay mapped, and Close unmaps those.
func rtCheckMappings(t *testing.T, r *rtRig) {
	if got, want := r.f.liveMappings(), len(r.ringPages)+r.x.Stats().Persistent; got != want {
		t.Errorf("%d pages mapped after Serve, want %d (ring + cache)", got, want)
	}
	if err := r.x.Close(); err != nil {
		t.Fatal(err)
	}
	if r.f.liveMappings() != 0 {
		t.Fatalf("%d pages mapped after Close", r.f.liveMappings())
	}
}

// rtCheckImage: the image holds what the guest wrote, 11 direct pages then
// the indirect ones, and an independent reader (qemu-img compare against a
// reference holding exactly those bytes at sector 8) agrees.
func rtCheckImage(t *testing.T, r *rtRig) {
	want := make([]byte, 0, (blkif.SegmentsMax+rtNIndirect)*pageSize)
	for i := range blkif.SegmentsMax {
		want = append(want, r.f.page(rtDataPage+i)...)
	}
	for i := range rtNIndirect {
		want = append(want, r.f.page(rtDataPage+i%48)...)
	}
	got, err := os.ReadFile(r.path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[8*512:8*512+len(want)], want) {
		t.Fatal("image contents differ from what the guest wrote")
	}
	qemuImg := oracle.Require(t, "qemu-img")
	ref := make([]byte, rtSize)
	copy(ref[8*512:], want)
	refPath := filepath.Join(t.TempDir(), "want.raw")
	if err := os.WriteFile(refPath, ref, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(qemuImg, "compare", "-f", "raw", "-F", "raw", refPath, r.path).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare: %v\n%s", err, out)
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
