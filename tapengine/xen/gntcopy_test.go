package xen

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/raw"
	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/ring"
)

// TestGrantCopyFailedSegment: without persistent grants a request whose
// one segment the hypervisor refuses to copy fails as a whole, in the same
// batch as requests that succeed: a write leaves the image untouched (its
// data is copied in before any reaches the image), a read answers an error
// rather than success over a page never filled, and an indirect request
// whose descriptor page is refused fails too. No data page is ever mapped.
func TestGrantCopyFailedSegment(t *testing.T) {
	const (
		dataPage = 16 // guest pages 16..26 hold data, 32..53 read buffers
		readPage = 32
		indPage  = 60
		// refs that Xen refuses to copy, though granted
		badRef  = 2000
		badRead = 2001
		badInd  = 2002
	)
	f := newFakeXen(t, testDomid, 64)
	g := newGuestRing(t, f, []int{2}, blkif.X86_64)
	f.grant(500, 2, false)
	for p := dataPage; p <= indPage; p++ {
		f.grant(uint32(1000+p), p, false)
	}
	f.grant(badRef, dataPage+3, false)
	f.grant(badRead, readPage+5, false)
	f.grant(badInd, indPage, false)
	f.copyStatus = map[uint32]int16{badRef: -1, badRead: -9, badInd: -3}
	path, img := tempRaw(t, 1<<20)
	x, stats := serveCopying(t, f, img)
	rw := fullRW
	for i := range blkif.SegmentsMax {
		fill(f.page(dataPage+i), byte(40+i))
	}
	// 1 writes sectors 0.., 2 (segment 3 refused) sectors 128..
	expectOK(t, g.do(rw(1, blkif.OpWrite, 0, 1000+dataPage)), 1)
	bad := rw(2, blkif.OpWrite, 128, 1000+dataPage)
	bad.Seg[3].Gref = badRef
	rsp := g.do(bad, rw(3, blkif.OpRead, 0, 1000+readPage+11))
	if rsp[2].Status != blkif.StatusError {
		t.Errorf("write with a refused segment: status %d, want error", rsp[2].Status)
	}
	expectOK(t, rsp, 3)
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[128*512:128*512+blkif.SegmentsMax*pageSize], make([]byte, blkif.SegmentsMax*pageSize)) {
		t.Error("a write with a refused segment reached the image")
	}
	for i := range blkif.SegmentsMax {
		if !bytes.Equal(f.page(readPage+11+i), f.page(dataPage+i)) {
			t.Fatalf("read segment %d differs from what was written", i)
		}
	}
	// A read whose segment 5 is refused; an indirect read whose descriptor page is.
	r4 := rw(4, blkif.OpRead, 0, 1000+readPage)
	r4.Seg[5].Gref = badRead
	rsp = g.do(r4, indirectRead(5, badInd))
	for id := uint64(4); id <= 5; id++ {
		if rsp[id].Status != blkif.StatusError {
			t.Errorf("request %d: status %d, want error", id, rsp[id].Status)
		}
	}
	st := x.Stats()
	if st.Maps != 0 || st.CopyFailures != 3 || f.liveMappings() != 1 {
		t.Errorf("stats %+v, %d pages mapped (want no data map, 3 failed copies, only the ring mapped)", st, f.liveMappings())
	}
	if stats.Invalid.Load() != 3 || stats.Errors.Load() != 3 {
		t.Errorf("ring counted %d invalid, %d errors; want the 3 refused grants, as invalid", stats.Invalid.Load(), stats.Errors.Load())
	}
}

// serveCopying attaches to f's one-page ring (ref 500) without persistent
// grants, checks that the transport copies, and serves img on 2 workers
// until the test ends.
func serveCopying(t *testing.T, f *fakeXen, img *raw.Image) (*Transport, *ring.Stats) {
	t.Helper()
	tr, err := Attach(f.device(), Options{Domid: testDomid, RingRefs: []uint32{500}, EventChannel: f.remotePort})
	if err != nil {
		t.Fatal(err)
	}
	x := tr.(*Transport)
	if !x.Copying() {
		t.Fatal("a frontend without persistent grants on a device with grant copy does not copy")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	stats := new(ring.Stats)
	go func() {
		done <- ring.Serve(ctx, tr, blkif.X86_64, img, ring.Options{MaxIndirectSegments: 32, Stats: stats, Workers: 2})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		tr.Close()
	})
	return x, stats
}

// fullRW is a request of SegmentsMax whole pages at sector, the refs
// first, first+1, ...
func fullRW(id uint64, op uint8, sector uint64, first uint32) blkif.Request {
	q := blkif.Request{Op: op, NrSegments: blkif.SegmentsMax, ID: id, Sector: sector}
	for i := range blkif.SegmentsMax {
		q.Seg[i] = blkif.Segment{Gref: first + uint32(i), LastSect: 7}
	}
	return q
}

// tempRaw is a zeroed raw image of size bytes, closed at the test's end.
func tempRaw(t *testing.T, size int) (string, *raw.Image) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(path, make([]byte, size), 0o644); err != nil {
		t.Fatal(err)
	}
	img, err := raw.Open(path, raw.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return path, img
}

func indirectRead(id uint64, indRef uint32) blkif.Request {
	q := blkif.Request{Op: blkif.OpIndirect, IndirectOp: blkif.OpRead, IndirectSegments: 4, ID: id}
	q.IndirectGrefs[0] = indRef
	return q
}

// TestGrantCopyChecks: segments a copy cannot take are refused before the
// kernel sees them, and a kernel without the ioctl leaves the transport
// mapping per request.
func TestGrantCopyChecks(t *testing.T) {
	buf := make([]byte, 8192)
	st := make([]int16, 2)
	for _, c := range []struct {
		segs []ring.CopySeg
		n    int
	}{
		{[]ring.CopySeg{{Ref: 1, Off: 4000, Len: 200}}, 200},          // past the page
		{[]ring.CopySeg{{Ref: 1, Len: 0}}, 0},                         // empty
		{[]ring.CopySeg{{Ref: 1, Len: 512}, {Ref: 2, Len: 512}}, 512}, // not the buffer's length
		{[]ring.CopySeg{{Ref: 1, Len: 512}, {Ref: 2, Len: 512}, {Ref: 3, Len: 512}}, 1536},
	} {
		if err := checkCopy(c.segs, buf[:c.n], st); !errors.Is(err, ErrBadOptions) {
			t.Errorf("checkCopy(%v, %d bytes) = %v, want ErrBadOptions", c.segs, c.n, err)
		}
	}
	if err := checkCopy([]ring.CopySeg{{Ref: 1, Off: 512, Len: 3584}}, buf[:3584], st); err != nil {
		t.Errorf("checkCopy of a page's tail: %v", err)
	}
	f := newFakeXen(t, testDomid, 8)
	f.noCopy = true
	if x := attachFake(t, f, []int{1}, false, 0); x.Copying() {
		t.Error("copying on a device without grant copy")
	}
	f2 := newFakeXen(t, testDomid, 8)
	if x := attachFake(t, f2, []int{1}, true, 0); x.Copying() {
		t.Error("copying for a frontend with persistent grants")
	}
}

// TestGrantCopyOnAKernelWithout: the real device's ioctl path against a
// descriptor that is no gntdev (/dev/null answers ENOTTY, as a kernel
// before grant copy does): the probe reports it unsupported, and a copy
// with segments is an error, never a success.
func TestGrantCopyOnAKernelWithout(t *testing.T) {
	fd, err := unix.Open("/dev/null", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	d := &sysDevice{gnt: fd, evt: -1}
	defer d.Close()
	if err := d.GrantCopy(testDomid, nil, nil, false, nil); !copyUnsupported(err) {
		t.Fatalf("probe on /dev/null = %v, want ENOTTY", err)
	}
	buf, st := make([]byte, 1024), make([]int16, 2)
	segs := []ring.CopySeg{{Ref: 9, Off: 512, Len: 512}, {Ref: 10, Len: 512}}
	if err := d.GrantCopy(testDomid, segs, buf, true, st); !errors.Is(err, unix.ENOTTY) {
		t.Fatalf("copy on /dev/null = %v, want ENOTTY", err)
	}
}

// TestEncodeCopySeg: the grant side and the local side land where the
// headers put them (offsets checked by TestABIAgainstHeaders), swapped
// for a copy to the guest, with the flag naming the grant side.
func TestEncodeCopySeg(t *testing.T) {
	b := make([]byte, sizeGrantCopySeg)
	for i := range b {
		b[i] = 0xff // status must come out zeroed
	}
	encodeCopySeg(b, 7, ring.CopySeg{Ref: 0x1234, Off: 512, Len: 1024}, 0xabcdef00, false)
	if ne.Uint32(b[0:]) != 0x1234 || ne.Uint16(b[4:]) != 512 || ne.Uint16(b[6:]) != 7 ||
		ne.Uint64(b[8:]) != 0xabcdef00 || ne.Uint16(b[16:]) != 1024 || ne.Uint16(b[18:]) != gntcopySourceGref ||
		ne.Uint16(b[20:]) != 0 {
		t.Fatalf("from the guest: % x", b)
	}
	encodeCopySeg(b, 7, ring.CopySeg{Ref: 0x1234, Off: 512, Len: 1024}, 0xabcdef00, true)
	if ne.Uint64(b[0:]) != 0xabcdef00 || ne.Uint32(b[8:]) != 0x1234 || ne.Uint16(b[12:]) != 512 ||
		ne.Uint16(b[14:]) != 7 || ne.Uint16(b[18:]) != gntcopyDestGref {
		t.Fatalf("to the guest: % x", b)
	}
}
