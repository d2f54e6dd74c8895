package nbd

import (
	"testing"
)

// Benchmarks against nbdkit's memory plugin over a unix socket: one
// goroutine (queue depth 1), and b.RunParallel with 32 goroutines (QD32).
func benchIO(b *testing.B, write bool, parallel int) {
	srv := nbdkit(b, "memory", "256M")
	img := mustOpen(b, srv.uri(""), Options{})
	const bs = 4096
	blocks := img.Size() / bs
	// Touch every block first so reads are not served from holes.
	for off := int64(0); off < img.Size(); off += 1 << 20 {
		img.WriteAt(make([]byte, 1<<20), off)
	}
	io := img.ReadAt
	if write {
		io = img.WriteAt
	}
	// The i-th request: a stride that is prime to blocks visits them all.
	req := func(p []byte, i int64) error {
		_, err := io(p, (i*7919%blocks)*bs)
		return err
	}
	b.SetBytes(bs)
	b.ResetTimer()
	if parallel <= 1 {
		p := make([]byte, bs)
		for i := int64(0); b.Loop(); i++ {
			if err := req(p, i); err != nil {
				b.Fatal(err)
			}
		}
		return
	}
	b.SetParallelism(parallel)
	b.RunParallel(func(pb *testing.PB) {
		p := make([]byte, bs)
		for i := int64(1); pb.Next(); i++ {
			if err := req(p, i); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

func BenchmarkRead4KQD1(b *testing.B)   { benchIO(b, false, 1) }
func BenchmarkWrite4KQD1(b *testing.B)  { benchIO(b, true, 1) }
func BenchmarkRead4KQD32(b *testing.B)  { benchIO(b, false, 32) }
func BenchmarkWrite4KQD32(b *testing.B) { benchIO(b, true, 32) }
