package xen

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/tapengine/blkif"
)

const testDomid = 5

// attachFake grants ring pages ringPages (one ref per page, refs 100+i)
// and attaches.
func attachFake(t *testing.T, f *fakeXen, ringPages []int, persistent bool, maxPersistent int) *Transport {
	t.Helper()
	refs := make([]uint32, len(ringPages))
	for i, p := range ringPages {
		refs[i] = uint32(100 + i)
		f.grant(refs[i], p, false)
	}
	tr, err := Attach(f.device(), Options{Domid: testDomid, RingRefs: refs, EventChannel: f.remotePort,
		PersistentGrants: persistent, MaxPersistent: maxPersistent})
	if err != nil {
		t.Fatal(err)
	}
	x := tr.(*Transport)
	t.Cleanup(func() { x.Close() })
	return x
}

// TestRingMapping: every order 0..4 maps the ring refs, scattered in
// guest memory, into one contiguous writable ring shared with the guest.
func TestRingMapping(t *testing.T) {
	for order := 0; order <= blkif.MaxRingOrder; order++ {
		f := newFakeXen(t, testDomid, 64)
		n := 1 << order
		pages := make([]int, n)
		for i := range pages {
			pages[i] = 60 - 3*i // descending, with gaps
		}
		tr := attachFake(t, f, pages, false, 0)
		r := tr.Ring()
		if len(r) != blkif.RingSize(order) {
			t.Fatalf("order %d: ring of %d bytes", order, len(r))
		}
		for i, p := range pages {
			f.page(p)[17] = byte(i + 1)
			if r[i*pageSize+17] != byte(i+1) {
				t.Fatalf("order %d: ring page %d is not guest page %d", order, i, p)
			}
			r[i*pageSize+99] = byte(0x80 + i)
			if f.page(p)[99] != byte(0x80+i) {
				t.Fatalf("order %d: backend write to ring page %d not seen by the guest", order, i)
			}
		}
		if bound, _, _, _ := f.state(); !bound || tr.LocalPort() != f.localPort {
			t.Fatalf("order %d: port bound %v, local port %d", order, bound, tr.LocalPort())
		}
	}
}

// TestAttachRefused: bad parameters and ungranted rings fail with their
// class, leave nothing mapped or bound, and close the device.
func TestAttachRefused(t *testing.T) {
	cases := []struct {
		name string
		opts func(o *Options)
		want error
	}{
		{"no ring refs", func(o *Options) { o.RingRefs = nil }, ErrBadOptions},
		{"3 ring refs", func(o *Options) { o.RingRefs = []uint32{100, 101, 102} }, ErrBadOptions},
		{"32 ring refs", func(o *Options) { o.RingRefs = make([]uint32, 32) }, ErrBadOptions},
		{"repeated ring ref", func(o *Options) { o.RingRefs = []uint32{100, 100} }, ErrBadOptions},
		{"port 0", func(o *Options) { o.EventChannel = 0 }, ErrBadOptions},
		{"port too big", func(o *Options) { o.EventChannel = 1 << 17 }, ErrBadOptions},
		{"reserved domid", func(o *Options) { o.Domid = 0x7ff2 }, ErrBadOptions},
		{"negative limit", func(o *Options) { o.MaxPersistent = -1 }, ErrBadOptions},
		{"ungranted ring", func(o *Options) { o.RingRefs = []uint32{100, 999} }, ErrNotGranted},
		{"read-only ring", func(o *Options) { o.RingRefs = []uint32{102} }, ErrNotGranted},
		{"other domain", func(o *Options) { o.Domid = 6 }, ErrNotGranted},
		{"wrong port", func(o *Options) { o.EventChannel = 8 }, errFake},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := newFakeXen(t, testDomid, 8)
			f.grant(100, 1, false)
			f.grant(101, 2, false)
			f.grant(102, 3, true)
			o := Options{Domid: testDomid, RingRefs: []uint32{100, 101}, EventChannel: f.remotePort}
			c.opts(&o)
			tr, err := Attach(f.device(), o)
			if !errors.Is(err, c.want) || tr != nil {
				t.Fatalf("Attach = %v, %v; want %v", tr, err, c.want)
			}
			bound, closed, _, _ := f.state()
			if bound || !closed || f.liveMappings() != 0 {
				t.Fatalf("after a failed Attach: bound %v, device closed %v, %d pages mapped", bound, closed, f.liveMappings())
			}
		})
	}
	if _, err := Attach(nil, Options{}); !errors.Is(err, ErrBadOptions) {
		t.Errorf("nil device: %v", err)
	}
}

// TestPagePerRequest: without persistent grants each Page maps, the
// mapping shares the guest's page with the granted access, and the
// release points unmap it.
func TestPagePerRequest(t *testing.T) {
	f := newFakeXen(t, testDomid, 16)
	tr := attachFake(t, f, []int{0}, false, 0)
	f.grant(7, 7, false)
	f.grant(8, 8, true)

	p, err := tr.Page(7, true)
	if err != nil {
		t.Fatal(err)
	}
	if len(p) != pageSize || cap(p) != pageSize {
		t.Fatalf("page len %d cap %d", len(p), cap(p))
	}
	p[5] = 0xaa
	if f.page(7)[5] != 0xaa {
		t.Fatal("data page not shared with the guest")
	}
	f.page(8)[9] = 0x55
	q, err := tr.Page(8, false)
	if err != nil || q[9] != 0x55 {
		t.Fatalf("read-only page: %v", err)
	}
	if _, err := tr.Page(8, true); !errors.Is(err, ErrNotGranted) {
		t.Errorf("writable map of a read-only grant: %v", err)
	}
	if _, err := tr.Page(9, false); !errors.Is(err, ErrNotGranted) {
		t.Errorf("ungranted ref: %v", err)
	}
	if _, err := tr.Page(100, false); !errors.Is(err, ErrNotGranted) {
		t.Errorf("the ring's own ref as a data page: %v", err)
	}
	// The same ref twice is two mappings: nothing is cached.
	if _, err := tr.Page(7, true); err != nil {
		t.Fatal(err)
	}
	if got := f.liveMappings(); got != 1+3 {
		t.Fatalf("%d pages mapped, want ring + 3", got)
	}
	for i, release := range []func() error{tr.ReleasePages, tr.Ack, tr.Notify} {
		if _, err := tr.Page(7, false); err != nil {
			t.Fatal(err)
		}
		if err := release(); err != nil {
			t.Fatal(err)
		}
		if got := f.liveMappings(); got != 1 {
			t.Fatalf("release point %d left %d pages mapped, want only the ring", i, got)
		}
	}
	if s := tr.Stats(); s.Maps != s.Unmaps || s.Hits != 0 || s.Transient != 0 {
		t.Fatalf("stats %+v", s)
	}
}

// TestTransientCap: live per-request mappings are bounded.
func TestTransientCap(t *testing.T) {
	f := newFakeXen(t, testDomid, 8)
	f.grant(100, 0, false)
	f.grant(7, 7, false)
	tr, err := Attach(f.device(), Options{Domid: testDomid, RingRefs: []uint32{100}, EventChannel: f.remotePort, MaxTransient: 3})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	for range 3 {
		if _, err := tr.Page(7, false); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := tr.Page(7, false); !errors.Is(err, ErrTooManyMappings) {
		t.Fatalf("4th mapping: %v", err)
	}
	tr.(*Transport).ReleasePages()
	if _, err := tr.Page(7, false); err != nil {
		t.Fatalf("after release: %v", err)
	}
}

// TestPersistentCache: refs are mapped once and reused; the cache holds
// at most MaxPersistent refs, overflow is mapped per request, and a full
// cache that missed evicts its least recently used entries at a release
// point, never the ones just used.
func TestPersistentCache(t *testing.T) {
	const max = 10
	f := newFakeXen(t, testDomid, 64)
	tr := attachFake(t, f, []int{0}, true, max)
	for r := uint32(1); r <= 20; r++ {
		f.grant(r, int(r), false)
	}
	for r := uint32(1); r <= max; r++ {
		if _, err := tr.Page(r, r%2 == 0); err != nil {
			t.Fatal(err)
		}
	}
	_, _, _, mapsBefore := f.state()
	for range 3 {
		for r := uint32(1); r <= max; r++ {
			p, err := tr.Page(r, true)
			if err != nil {
				t.Fatal(err)
			}
			p[0] = byte(r)
			if f.page(int(r))[0] != byte(r) {
				t.Fatal("cached page not shared")
			}
		}
	}
	if _, _, _, maps := f.state(); maps != mapsBefore {
		t.Fatalf("cache hits mapped %d more times", maps-mapsBefore)
	}
	s := tr.Stats()
	if s.Persistent != max || s.Hits != 3*max {
		t.Fatalf("stats %+v", s)
	}
	// Full: ref 11 is mapped per request and unmapped at the release.
	if _, err := tr.Page(11, true); err != nil {
		t.Fatal(err)
	}
	if s := tr.Stats(); s.Persistent != max || s.Transient != 1 {
		t.Fatalf("overflow: %+v", s)
	}
	// Refs 2..10 are used again, so 1 is the least recently used.
	for r := uint32(2); r <= max; r++ {
		tr.Page(r, false)
	}
	if err := tr.Ack(); err != nil {
		t.Fatal(err)
	}
	s = tr.Stats()
	if s.Transient != 0 || s.Evictions != 1 || s.Persistent != max-1 {
		t.Fatalf("after release: %+v", s)
	}
	if got := f.liveMappings(); got != 1+max-1 {
		t.Fatalf("%d pages mapped, want ring + %d", got, max-1)
	}
	// Ref 1 was the one evicted: using it maps again; 2 is still cached.
	_, _, _, m0 := f.state()
	tr.Page(2, true)
	if _, _, _, m1 := f.state(); m1 != m0 {
		t.Fatal("ref 2 was evicted")
	}
	tr.Page(1, true)
	if _, _, _, m2 := f.state(); m2 != m0+1 {
		t.Fatal("ref 1 was not evicted")
	}
	tr.ReleasePages()
	tr.Close()
}

// TestPersistentCacheReadOnly: a read-only grant is cached read-only and
// refused for writing.
func TestPersistentCacheReadOnly(t *testing.T) {
	f2 := newFakeXen(t, testDomid, 64)
	tr2 := attachFake(t, f2, []int{0}, true, 0)
	f2.grant(30, 30, true)
	if _, err := tr2.Page(30, false); err != nil {
		t.Fatal(err)
	}
	if _, err := tr2.Page(30, true); !errors.Is(err, ErrNotGranted) {
		t.Fatalf("writable use of a read-only persistent grant: %v", err)
	}
	if _, err := tr2.Page(30, false); err != nil {
		t.Fatal(err)
	}
	if s := tr2.Stats(); s.Hits != 1 || s.Persistent != 1 {
		t.Fatalf("read-only cache: %+v", s)
	}
}

// TestClose: Close unmaps the ring and every data page, cached or not,
// unbinds the port and closes the device; afterwards calls fail cleanly.
func TestClose(t *testing.T) {
	for _, persistent := range []bool{false, true} {
		f := newFakeXen(t, testDomid, 32)
		tr := attachFake(t, f, []int{0, 1, 2, 3}, persistent, 4)
		for r := uint32(10); r < 20; r++ {
			f.grant(r, int(r), false)
			if _, err := tr.Page(r, true); err != nil {
				t.Fatal(err)
			}
		}
		if f.liveMappings() != 4+10 {
			t.Fatalf("%d pages mapped", f.liveMappings())
		}
		if err := tr.Close(); err != nil {
			t.Fatal(err)
		}
		bound, closed, _, _ := f.state()
		if f.liveMappings() != 0 || bound || !closed {
			t.Fatalf("persistent %v: after Close %d pages mapped, bound %v, closed %v", persistent, f.liveMappings(), bound, closed)
		}
		if err := tr.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
		if _, err := tr.Page(10, false); !errors.Is(err, ErrClosed) {
			t.Errorf("Page after Close: %v", err)
		}
		if err := tr.Notify(); !errors.Is(err, ErrClosed) {
			t.Errorf("Notify after Close: %v", err)
		}
		if err := tr.Ack(); !errors.Is(err, ErrClosed) {
			t.Errorf("Ack after Close: %v", err)
		}
		if tr.WaitFD() != -1 {
			t.Error("WaitFD after Close")
		}
	}
}

func readable(t *testing.T, fd int) bool {
	t.Helper()
	p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	n, err := unix.Poll(p, 0)
	if err != nil {
		t.Fatal(err)
	}
	return n == 1
}

// TestEvents: a guest signal makes WaitFD readable; Ack consumes it and
// unmasks the port, so a signal sent while masked fires on the unmask;
// Notify reaches the guest.
func TestEvents(t *testing.T) {
	f := newFakeXen(t, testDomid, 4)
	tr := attachFake(t, f, []int{0}, false, 0)
	fd := tr.WaitFD()
	if readable(t, fd) {
		t.Fatal("readable before any signal")
	}
	f.kick()
	if !readable(t, fd) {
		t.Fatal("signal did not make WaitFD readable")
	}
	// Masked now: a second signal is held, not lost.
	f.kick()
	if err := tr.Ack(); err != nil {
		t.Fatal(err)
	}
	if !readable(t, fd) {
		t.Fatal("signal sent while masked was lost at unmask")
	}
	if err := tr.Ack(); err != nil {
		t.Fatal(err)
	}
	if readable(t, fd) {
		t.Fatal("Ack left events pending")
	}
	// Nothing fired: Ack must not unmask or fail.
	if err := tr.Ack(); err != nil {
		t.Fatal(err)
	}
	if s := tr.Stats(); s.Events != 2 {
		t.Fatalf("events %d, want 2", s.Events)
	}
	// Stray ports (another binding on the fd) are counted, never unmasked.
	unix.Write(f.evW, encodePort(99))
	if err := tr.Ack(); err != nil {
		t.Fatal(err)
	}
	if s := tr.Stats(); s.StrayEvents != 1 {
		t.Fatalf("stray events %d", s.StrayEvents)
	}
	for range 3 {
		if err := tr.Notify(); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, n, _ := f.state(); n != 3 {
		t.Fatalf("guest got %d notifications, want 3", n)
	}
}

// TestNoXen: without /dev/xen the error says so, in its class.
func TestNoXen(t *testing.T) {
	_, err := openDevice(t.TempDir())
	if !errors.Is(err, ErrNoXen) {
		t.Fatalf("openDevice(empty dir): %v", err)
	}
	if err := unix.Access(DefaultDir+"/gntdev", unix.F_OK); err != nil {
		if _, err := OpenDevice(); !errors.Is(err, ErrNoXen) {
			t.Fatalf("OpenDevice without %s: %v", DefaultDir, err)
		}
	}
}

func TestDecodePorts(t *testing.T) {
	var ports [4]uint32
	b := append(encodePort(3), encodePort(70000)...)
	n, err := decodePorts(b, ports[:])
	if err != nil || n != 2 || ports[0] != 3 || ports[1] != 70000 {
		t.Fatalf("decodePorts = %d %v %v", n, ports, err)
	}
	if _, err := decodePorts(b[:5], ports[:]); err == nil {
		t.Fatal("partial port accepted")
	}
}
