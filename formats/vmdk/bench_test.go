package vmdk

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats/internal/imagetest"
)

// benchImage is a 256 MiB monolithicSparse image on disk with every grain
// allocated (so lookups hit tables, not holes).
func benchImage(b *testing.B) *Image {
	b.Helper()
	p := filepath.Join(b.TempDir(), "b.vmdk")
	const size = 256 << 20
	if err := Create(p, CreateOptions{Size: size}); err != nil {
		b.Fatal(err)
	}
	img, err := Open(p, Options{})
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i)
	}
	for off := int64(0); off < size; off += int64(len(buf)) {
		if _, err := img.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
	if err := img.Flush(); err != nil {
		b.Fatal(err)
	}
	return img
}

// BenchmarkLookup is the grain-table lookup alone (cache hit).
func BenchmarkLookup(b *testing.B) {
	img := benchImage(b)
	defer img.Close()
	sp := img.extents[0].sp
	n := uint64(img.Size() / sp.h.grainBytes())
	r := rand.New(rand.NewPCG(1, 1))
	b.ResetTimer()
	for b.Loop() {
		sp.mu.Lock()
		_, _, err := sp.lookupLocked(r.Uint64N(n))
		sp.mu.Unlock()
		if err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReadAt4K is a random 4 KiB read through lookup and pread.
func BenchmarkReadAt4K(b *testing.B) {
	img := benchImage(b)
	defer img.Close()
	imagetest.Random4K(b, img, 1, false)
}

// BenchmarkReadAt4KParallel: the same from many goroutines (lock contention).
func BenchmarkReadAt4KParallel(b *testing.B) {
	img := benchImage(b)
	defer img.Close()
	b.SetBytes(4096)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		buf := make([]byte, 4096)
		r := rand.New(rand.NewPCG(rand.Uint64(), 1))
		for pb.Next() {
			if _, err := img.ReadAt(buf, r.Int64N(img.Size()/4096)*4096); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkWriteAt4K is a random 4 KiB overwrite of allocated grains.
func BenchmarkWriteAt4K(b *testing.B) {
	img := benchImage(b)
	defer img.Close()
	imagetest.Random4K(b, img, 1, true)
}

// BenchmarkAllocate64K appends new grains (whole-grain writes).
func BenchmarkAllocate64K(b *testing.B) {
	p := filepath.Join(b.TempDir(), "a.vmdk")
	if err := Create(p, CreateOptions{Size: 64 << 30}); err != nil {
		b.Fatal(err)
	}
	img, err := Open(p, Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer img.Close()
	buf := make([]byte, 64<<10)
	b.SetBytes(int64(len(buf)))
	var off int64
	for b.Loop() {
		if _, err := img.WriteAt(buf, off%img.Size()); err != nil {
			b.Fatal(err)
		}
		off += int64(len(buf))
	}
}

// BenchmarkWriteStreamOptimized converts a 64 MiB image with compressible
// data (text-like runs) to streamOptimized; compare with
// `qemu-img convert -O vmdk -o subformat=streamOptimized` on the same file.
func BenchmarkWriteStreamOptimized(b *testing.B) {
	dir := b.TempDir()
	src := filepath.Join(dir, "src.vmdk")
	if err := Create(src, CreateOptions{Size: 64 << 20}); err != nil {
		b.Fatal(err)
	}
	img, err := Open(src, Options{})
	if err != nil {
		b.Fatal(err)
	}
	r := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = "abcdefgh ijklmnop\n"[r.IntN(18)]
	}
	for off := int64(0); off < img.Size(); off += int64(len(buf)) {
		img.WriteAt(buf, off)
	}
	img.Close()
	in, err := Open(src, Options{ReadOnly: true})
	if err != nil {
		b.Fatal(err)
	}
	defer in.Close()
	b.SetBytes(in.Size())
	i := 0
	for b.Loop() {
		i++
		out := filepath.Join(dir, fmt.Sprintf("so%d.vmdk", i))
		if err := WriteStreamOptimized(context.Background(), out, in); err != nil {
			b.Fatal(err)
		}
		os.Remove(out)
	}
	b.StopTimer()
	if q, err := exec.LookPath("qemu-img"); err == nil {
		out := filepath.Join(dir, "q.vmdk")
		start := time.Now()
		if o, err := exec.Command(q, "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src, out).CombinedOutput(); err != nil {
			b.Fatalf("%v %s", err, o)
		}
		b.ReportMetric(float64(time.Since(start).Nanoseconds()), "qemu-ns/op")
	}
}

// BenchmarkMap maps a fully allocated 256 MiB image (4096 grains).
func BenchmarkMap(b *testing.B) {
	img := benchImage(b)
	defer img.Close()
	b.ResetTimer()
	for b.Loop() {
		ext, err := img.Map(0, img.Size())
		if err != nil || len(ext) != 1 {
			b.Fatal(err, ext)
		}
	}
}
