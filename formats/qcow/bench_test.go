package qcow

import (
	"context"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/blktap-go/blktap/formats/internal/imagetest"
	"github.com/blktap-go/blktap/internal/oracle"
)

// emptyImage is a new image with nothing allocated, so every write to it
// allocates; it is closed when the benchmark ends.
func emptyImage(b *testing.B, opts CreateOptions) *Image {
	b.Helper()
	path := filepath.Join(b.TempDir(), "bench.qcow")
	if err := Create(path, opts); err != nil {
		b.Fatal(err)
	}
	img, err := Open(path, Options{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { img.Close() })
	return img
}

// benchImage makes a 64 MiB image on disk with every cluster allocated.
func benchImage(b *testing.B, opts CreateOptions) *Image {
	b.Helper()
	img := emptyImage(b, opts)
	buf := make([]byte, 4<<20)
	for off := int64(0); off < img.Size(); off += int64(len(buf)) {
		buf[0] = 1 // not zero, so it is a real cluster
		if _, err := img.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
	return img
}

// BenchmarkLookup is the block lookup path alone: virtual cluster to host
// offset through the in-memory L1 and the L2 cache.
func BenchmarkLookup(b *testing.B) {
	img := benchImage(b, CreateOptions{Size: 64 << 20})
	n := img.Size() >> img.h.clusterBits
	rng := rand.New(rand.NewPCG(1, 1))
	b.ResetTimer()
	for b.Loop() {
		if _, _, _, err := img.resolve(rng.Int64N(n), 1); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkLookupParallel(b *testing.B) {
	img := benchImage(b, CreateOptions{Size: 64 << 20})
	n := img.Size() >> img.h.clusterBits
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		rng := rand.New(rand.NewPCG(rand.Uint64(), 1))
		for pb.Next() {
			img.resolve(rng.Int64N(n), 1)
		}
	})
}

func BenchmarkReadAt4K(b *testing.B) {
	imagetest.Random4K(b, benchImage(b, CreateOptions{Size: 64 << 20}), 2, false)
}

func BenchmarkWriteAt4KInPlace(b *testing.B) {
	imagetest.Random4K(b, benchImage(b, CreateOptions{Size: 64 << 20}), 3, true)
}

// BenchmarkWriteAt64KAllocating pays one fdatasync per allocating write.
func BenchmarkWriteAt64KAllocating(b *testing.B) {
	img := emptyImage(b, CreateOptions{Size: 1 << 40})
	buf := make([]byte, 64<<10)
	b.SetBytes(int64(len(buf)))
	off := int64(0)
	b.ResetTimer()
	for b.Loop() {
		if _, err := img.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
		off = (off + int64(len(buf))) % img.Size()
	}
}

// BenchmarkWriteAt4KAllocatingParallel: concurrent writers to fresh
// clusters share fdatasync barriers (group commit).
func BenchmarkWriteAt4KAllocatingParallel(b *testing.B) {
	img := emptyImage(b, CreateOptions{Size: 1 << 40})
	var next atomic.Int64
	b.SetBytes(4096)
	b.SetParallelism(16)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		buf := make([]byte, 4096)
		for pb.Next() {
			off := (next.Add(1) * 4096 * 7) % img.Size()
			if _, err := img.WriteAt(buf, off); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkQcow2Raw compares our qcow2raw with `qemu-img convert -O raw`
// on the same 64 MiB image (half data, half holes), in one run.
func BenchmarkQcow2Raw(b *testing.B) {
	dir := b.TempDir()
	src := filepath.Join(dir, "src.qcow")
	if err := Create(src, CreateOptions{Size: 64 << 20}); err != nil {
		b.Fatal(err)
	}
	img, err := Open(src, Options{})
	if err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(5, 5))
	for off := int64(0); off < img.Size(); off += 2 << 20 {
		img.WriteAt(randBytes(rng, 1<<20), off)
	}
	img.Close()
	out := filepath.Join(dir, "out.raw")
	b.Run("ours", func(b *testing.B) {
		b.SetBytes(64 << 20)
		for b.Loop() {
			os.Remove(out)
			if err := Qcow2Raw(context.Background(), out, src); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("qemu-img", func(b *testing.B) {
		qi := oracle.Require(b, "qemu-img")
		b.SetBytes(64 << 20)
		for b.Loop() {
			os.Remove(out)
			if err := exec.Command(qi, "convert", "-O", "raw", src, out).Run(); err != nil {
				b.Fatal(err)
			}
		}
	})
}
