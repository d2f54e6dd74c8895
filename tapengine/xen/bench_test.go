package xen

import "testing"

// BenchmarkPage: a data-page lookup with persistent grants (cache hit)
// against mapping per request (map now, unmap at the release point), over
// the fake device. On Xen the per-request path adds two hypercalls and
// TLB shootdowns the fake cannot show, so read it as a floor.
func BenchmarkPage(b *testing.B) {
	for _, c := range []struct {
		name       string
		persistent bool
	}{{"persistent-hit", true}, {"per-request", false}} {
		b.Run(c.name, func(b *testing.B) {
			f := newFakeXen(b, testDomid, 64)
			f.grant(100, 0, false)
			for r := range 11 {
				f.grant(uint32(10+r), 10+r, false)
			}
			tr, err := Attach(f.device(), Options{Domid: testDomid, RingRefs: []uint32{100},
				EventChannel: f.remotePort, PersistentGrants: c.persistent})
			if err != nil {
				b.Fatal(err)
			}
			defer tr.Close()
			x := tr.(*Transport)
			b.ReportAllocs()
			b.SetBytes(11 * pageSize)
			for b.Loop() {
				// One 11-segment request, then the batch's release point.
				for r := range 11 {
					if _, err := x.Page(uint32(10+r), true); err != nil {
						b.Fatal(err)
					}
				}
				if err := x.ReleasePages(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
