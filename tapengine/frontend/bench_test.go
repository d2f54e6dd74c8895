package frontend

import (
	"fmt"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/ring"
)

// ctxsw counts the process's context switches (all threads) so far.
func ctxsw() int64 {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return ru.Nvcsw + ru.Nivcsw
}

// ioOf is f's ReadAt for op "read", its WriteAt otherwise.
func ioOf(f *Frontend, op string) func([]byte, int64) (int, error) {
	if op == "read" {
		return f.ReadAt
	}
	return f.WriteAt
}

// BenchmarkRoundTrip4k: a local frontend -> ring -> Serve -> file image
// 4 KiB round trip in one process, at QD1 and with many callers.
func BenchmarkRoundTrip4k(b *testing.B) {
	for _, op := range []string{"read", "write"} {
		b.Run(op+"/qd1", func(b *testing.B) {
			r := newRig(b, blkif.X86_64, 0, 64<<20, ring.Options{})
			buf := make([]byte, 4096)
			b.SetBytes(4096)
			b.ReportAllocs()
			cs := ctxsw()
			defer func() { b.ReportMetric(float64(ctxsw()-cs)/float64(b.N), "ctxsw/op") }()
			for i := 0; b.Loop(); i++ {
				if _, err := ioOf(r.f, op)(buf, int64(i%16384)*4096); err != nil {
					b.Fatal(err)
				}
			}
		})
		for _, workers := range []int{0, 2} {
			b.Run(fmt.Sprintf("%s/parallel/workers%d", op, workers), func(b *testing.B) {
				r := newRig(b, blkif.X86_64, 0, 64<<20, ring.Options{Workers: workers})
				b.SetBytes(4096)
				b.ReportAllocs()
				b.SetParallelism(16)
				cs := ctxsw()
				defer func() { b.ReportMetric(float64(ctxsw()-cs)/float64(b.N), "ctxsw/op") }()
				b.RunParallel(func(pb *testing.PB) {
					buf := make([]byte, 4096)
					i := 0
					for pb.Next() {
						off := int64(i%16384) * 4096
						i += 7
						if _, err := ioOf(r.f, op)(buf, off); err != nil {
							b.Error(err)
							return
						}
					}
				})
				b.ReportMetric(float64(r.stats.Batches.Load())/float64(r.stats.Reads.Load()+r.stats.Writes.Load()), "batches/req")
			})
		}
	}
}

// benchSink is a Completer that counts completions.
type benchSink struct{ done chan struct{} }

func (s *benchSink) Complete(uint64, []byte, error) { s.done <- struct{}{} }
func (s *benchSink) CompleteBatch()                 {}

// BenchmarkStartBatch32: what the guest view does at QD32: 32 reads
// started on lent tags, published once, completed on the reaper, tags
// put back. Reports time and allocations per request.
func BenchmarkStartBatch32(b *testing.B) {
	r := newRig(b, blkif.X86_64, 0, 64<<20, ring.Options{})
	sink := &benchSink{done: make(chan struct{}, 32)}
	tags := make([]uint64, 32)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i += 32 {
		for k := range tags {
			h, _, err := r.f.TakeTag()
			if err != nil {
				b.Fatal(err)
			}
			tags[k] = h
			if err := r.f.StartTagRead(h, int64((i+k)%16384)*4096, 4096, sink, uint64(k)); err != nil {
				b.Fatal(err)
			}
		}
		if err := r.f.Publish(); err != nil {
			b.Fatal(err)
		}
		for range tags {
			<-sink.done
		}
		for _, h := range tags {
			r.f.PutTag(h)
		}
	}
}

// BenchmarkPollQD1: one started read at a time, its answer collected by
// Poll on the caller's goroutine (the guest view at queue depth 1).
func BenchmarkPollQD1(b *testing.B) {
	r := newRig(b, blkif.X86_64, 0, 64<<20, ring.Options{})
	sink := &benchSink{done: make(chan struct{}, 1)}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if err := r.f.StartRead(int64(i%16384)*4096, 4096, sink, 0); err != nil {
			b.Fatal(err)
		}
		if err := r.f.Publish(); err != nil {
			b.Fatal(err)
		}
		r.f.Poll(time.Millisecond)
		<-sink.done
	}
}
