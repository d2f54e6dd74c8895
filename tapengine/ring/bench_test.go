package ring

import (
	"testing"

	"github.com/blktap-go/blktap/tapengine/blkif"
)

// BenchmarkRingPushPull: one request through both halves of a ring with
// no I/O and no signalling: push, publish, consume, respond, publish,
// collect, in batches of 32.
func BenchmarkRingPushPull(b *testing.B) {
	tr := newMemTransport(b, 0)
	front, _ := NewFront(tr.ring, blkif.X86_64)
	front.Init()
	back, _ := NewBack(tr.ring, blkif.X86_64)
	req := rw(blkif.OpRead, 0, 8, seg(1, 0, 7))
	var in blkif.Request
	var out blkif.Response
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		req.ID = uint64(i)
		if err := front.Push(&req); err != nil {
			b.Fatal(err)
		}
		if i%32 != 31 {
			continue
		}
		front.PushRequests()
		n, _ := back.Pending()
		for range n {
			back.Next(&in)
			back.Respond(&blkif.Response{ID: in.ID, Op: in.Op})
		}
		back.PushResponses()
		n, _ = front.Pending()
		for range n {
			front.Next(&out)
		}
		front.FinalCheck()
		back.FinalCheck()
	}
}

// BenchmarkServe4kRead: Serve on its locked thread answering 4 KiB reads
// from an in-memory image, the test goroutine acting as frontend with
// eventfd signalling both ways; qd requests in flight per round.
func BenchmarkServe4kRead(b *testing.B) {
	for _, qd := range []int{1, 32} {
		b.Run(map[int]string{1: "qd1", 32: "qd32"}[qd], func(b *testing.B) {
			h := newHarness(b, blkif.X86_64, 0, 1<<20, Options{})
			reqs := make([]blkif.Request, qd)
			for i := range reqs {
				h.tr.grant(uint32(10+i), false)
				reqs[i] = rw(blkif.OpRead, uint64(i), uint64(i*8), seg(uint32(10+i), 0, 7))
			}
			b.SetBytes(int64(4096 * qd))
			b.ReportAllocs()
			for b.Loop() {
				h.do(reqs...)
			}
			b.ReportMetric(float64(h.stats.Notifies.Load())/float64(h.stats.Reads.Load()), "notifies/req")
		})
	}
}
