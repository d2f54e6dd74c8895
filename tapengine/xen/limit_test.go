package xen

import (
	"context"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/ring"
)

// TestTransientBudget: the process budget of per-request maps stays well
// below vm.max_map_count (docs/WIRE.md, section "Grant mapping and event channels"), yet always
// fits the largest request.
func TestTransientBudget(t *testing.T) {
	for _, c := range []struct{ mapCount, want int }{
		{65530, 16382},    // the kernel default: a quarter
		{0, 16382},        // unreadable: as for the default
		{1 << 20, 16384},  // raised: at most 16384
		{8000, 8*512 + 8}, // lowered: still one largest request
	} {
		if got := transientCap(c.mapCount); got != c.want {
			t.Errorf("transientCap(%d) = %d, want %d", c.mapCount, got, c.want)
		}
	}
	if n := readMapCount(); n >= 4*minTransientCap {
		if size := processMaps().size; size > n/4 {
			t.Errorf("process budget %d is more than a quarter of max_map_count %d", size, n)
		}
	}
}

// TestBudgetOrder: a waiter is served before later takers, and one that
// gives up lets those behind it in.
func TestBudgetOrder(t *testing.T) {
	b := newMapBudget(4)
	if !b.tryTake(3) {
		t.Fatal("tryTake(3) of 4")
	}
	got := make(chan bool)
	go func() { got <- b.take(context.Background(), 3, time.Minute) }()
	for b.waiting() == 0 {
		time.Sleep(time.Millisecond)
	}
	if b.tryTake(1) {
		t.Fatal("tryTake jumped the queue")
	}
	b.give(3)
	if !<-got {
		t.Fatal("waiter not served")
	}
	if b.take(context.Background(), 2, 10*time.Millisecond) {
		t.Fatal("took 2 with 1 free")
	}
	b.give(3)
	if b.inUse() != 0 {
		t.Fatalf("%d in use after giving all back", b.inUse())
	}
}

// TestStopWhileWaitingForMappings: a ring stopped while a request waits
// for mappings leaves that request in the ring unanswered (an error
// would be a failed I/O in the guest), and the next Serve answers it.
func TestStopWhileWaitingForMappings(t *testing.T) {
	budget := newMapBudget(4)
	other := holdMappings(t, budget, 3)
	f, g := guestWithFourPages(t)
	img := &zeroImage{size: 1 << 20}
	tr, err := Attach(f.device(), Options{Domid: testDomid, RingRefs: []uint32{500}, EventChannel: f.remotePort, budget: budget})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	serve := func() (context.CancelFunc, chan error) {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- ring.Serve(ctx, tr, blkif.X86_64, img, ring.Options{}) }()
		return cancel, done
	}
	cancel, done := serve()

	r := blkif.Request{Op: blkif.OpRead, ID: 9, Sector: 8, NrSegments: 3}
	for i := range 3 {
		r.Seg[i] = blkif.Segment{Gref: uint32(1016 + i), LastSect: 7}
	}
	if err := g.front.Push(&r); err != nil {
		t.Fatal(err)
	}
	if g.front.PushRequests() {
		f.kick()
	}
	for budget.waiting() == 0 {
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if n, err := g.front.Pending(); n != 0 || err != nil {
		t.Fatalf("%d responses (%v) after a stop mid-wait, want none", n, err)
	}
	if n := budget.inUse(); n != 3 {
		t.Fatalf("%d mappings counted after the stop, want the other ring's 3", n)
	}

	if err := other.ReleasePages(); err != nil {
		t.Fatal(err)
	}
	cancel, done = serve()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	f.kick()
	for {
		if n, _ := g.front.Pending(); n > 0 {
			break
		}
		if more, _ := g.front.FinalCheck(); !more {
			f.waitIRQ()
		}
	}
	var rsp blkif.Response
	g.front.Next(&rsp)
	if rsp != (blkif.Response{ID: 9, Op: blkif.OpRead}) {
		t.Fatalf("response %+v", rsp)
	}
}

// zeroImage reads as zeros and takes writes without keeping them.
type zeroImage struct{ size int64 }

func (z *zeroImage) ReadAt(p []byte, off int64) (int, error)  { clear(p); return len(p), nil }
func (z *zeroImage) WriteAt(p []byte, off int64) (int, error) { return len(p), nil }
func (z *zeroImage) Size() int64                              { return z.size }
func (z *zeroImage) Flush() error                             { return nil }
func (z *zeroImage) Discard(off, n int64) error               { return nil }
func (z *zeroImage) Map(off, n int64) ([]image.Extent, error) {
	return []image.Extent{{Offset: off, Length: n}}, nil
}
func (z *zeroImage) Close() error { return nil }

// TestServeWaitsForMappings: a request that needs more per-request maps
// than the process has free waits until another ring releases its maps,
// then succeeds, instead of failing as a grant error.
func TestServeWaitsForMappings(t *testing.T) {
	budget := newMapBudget(4)

	// Another ring of the process holds 3 of the 4.
	other := holdMappings(t, budget, 3)
	f, g := guestWithFourPages(t)
	_, img := tempRaw(t, 1<<20)
	tr, err := Attach(f.device(), Options{Domid: testDomid, RingRefs: []uint32{500}, EventChannel: f.remotePort, budget: budget})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ring.Serve(ctx, tr, blkif.X86_64, img, ring.Options{}) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()

	r := blkif.Request{Op: blkif.OpRead, ID: 9, Sector: 8, NrSegments: 3}
	for i := range 3 {
		r.Seg[i] = blkif.Segment{Gref: uint32(1016 + i), LastSect: 7}
	}
	rsp := make(chan map[uint64]blkif.Response, 1)
	go func() { rsp <- g.do(r) }()
	for budget.waiting() == 0 {
		select {
		case got := <-rsp:
			t.Fatalf("answered without mappings to spare: %+v", got)
		case <-time.After(time.Millisecond):
		}
	}
	if err := other.ReleasePages(); err != nil {
		t.Fatal(err)
	}
	expectOK(t, <-rsp, 9)
	if n := budget.inUse(); n != 0 {
		t.Errorf("%d mappings still counted after the batch", n)
	}
}

// holdMappings attaches another ring of the process that takes n of the
// budget's mappings and keeps them until it releases them or the test ends.
func holdMappings(t *testing.T, budget *mapBudget, n int) *Transport {
	other := newFakeXen(t, testDomid, 8)
	other.grant(100, 0, false)
	other.grant(7, 7, false)
	ot, err := Attach(other.device(), Options{Domid: testDomid, RingRefs: []uint32{100}, EventChannel: other.remotePort, budget: budget})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ot.Close() })
	for range n {
		if _, err := ot.Page(7, false); err != nil {
			t.Fatal(err)
		}
	}
	return ot.(*Transport)
}

// guestWithFourPages is a guest ring on ref 500 whose data pages 16-19 are
// granted as refs 1016-1019.
func guestWithFourPages(t *testing.T) (*fakeXen, *guestRing) {
	f := newFakeXen(t, testDomid, 32)
	f.noCopy = true // the budget is for mappings, which grant copy never makes
	g := newGuestRing(t, f, []int{0}, blkif.X86_64)
	f.grant(500, 0, false)
	for p := 16; p < 20; p++ {
		f.grant(uint32(1000+p), p, false)
	}
	return f, g
}
