package qcow2

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/internal/oracle"
)

// benchImage makes a fully allocated image of size bytes.
func benchImage(b *testing.B, size, cs int64) *Image {
	b.Helper()
	p := filepath.Join(b.TempDir(), "b.qcow2")
	img, err := CreateImage(p, CreateOptions{Size: size, ClusterSize: cs}, Options{})
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		if _, err := img.WriteAt(buf, off); err != nil {
			b.Fatal(err)
		}
	}
	return img
}

// BenchmarkLookup is the block lookup path alone: guest offset to host
// segments under the metadata lock, L2 tables cached.
func BenchmarkLookup(b *testing.B) {
	img := benchImage(b, 256<<20, 65536)
	defer img.Close()
	rng := rand.New(rand.NewPCG(1, 1))
	segs := make([]segment, 0, 8)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		off := rng.Int64N(256<<20-4096) &^ 4095
		img.mu.Lock()
		var err error
		segs, err = img.segmentsLocked(off, 4096, segs[:0])
		img.mu.Unlock()
		if err != nil || len(segs) != 1 {
			b.Fatal(err, segs)
		}
	}
}

// BenchmarkLookupColdCache: an L2 cache of 4 tables over 64 tables'
// worth of disk (512 B clusters), so most lookups read an L2 table.
func BenchmarkLookupColdCache(b *testing.B) {
	w := benchImage(b, 2<<20, 512)
	w.Close()
	img, err := Open(w.path, Options{ReadOnly: true, L2CacheSize: 4 * 512})
	if err != nil {
		b.Fatal(err)
	}
	defer img.Close()
	rng := rand.New(rand.NewPCG(1, 1))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		off := rng.Int64N(2<<20-512) &^ 511
		img.mu.Lock()
		_, err := img.segmentsLocked(off, 512, nil)
		img.mu.Unlock()
		if err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if n := len(img.mu.l2); n > 4 {
		b.Fatalf("cache holds %d tables", n)
	}
	b.ReportMetric(float64(img.mu.l2misses)/float64(b.N), "misses/op")
}

func BenchmarkRead4KParallel(b *testing.B) {
	img := benchImage(b, 64<<20, 65536)
	defer img.Close()
	var seed atomic.Uint64
	b.SetBytes(4096)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		rng := rand.New(rand.NewPCG(seed.Add(1), 2))
		buf := make([]byte, 4096)
		for pb.Next() {
			if _, err := img.ReadAt(buf, rng.Int64N(64<<20-4096)&^4095); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkWrite4KAllocated(b *testing.B) {
	img := benchImage(b, 64<<20, 65536)
	defer img.Close()
	rng := rand.New(rand.NewPCG(1, 1))
	buf := make([]byte, 4096)
	b.SetBytes(4096)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := img.WriteAt(buf, rng.Int64N(64<<20-4096)&^4095); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkFirstWrite64K allocates a new cluster per write (sequential).
func BenchmarkFirstWrite64K(b *testing.B) { benchFirstWrites(b, 65536, 1, Options{}) }

// benchFirstWrites writes one whole cluster of a 1 TiB image per
// iteration, stride clusters apart, each into a new host cluster.
func benchFirstWrites(b *testing.B, cs, stride int64, opts Options) {
	p := filepath.Join(b.TempDir(), "f.qcow2")
	img, err := CreateImage(p, CreateOptions{Size: 1 << 40, ClusterSize: cs}, opts)
	if err != nil {
		b.Fatal(err)
	}
	defer img.Close()
	buf := make([]byte, cs)
	b.SetBytes(cs)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := img.WriteAt(buf, int64(i)*stride*cs); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkConvertToRawVsQemu converts one qemu-made qcow2 image (48 MiB
// of data in 64 MiB, 64 KiB clusters) to a sparse raw file with our
// reader and with `qemu-img convert -O raw`, in the same run, and
// reports ours/qemu wall-time ratio (below 1: we are faster).
func BenchmarkConvertToRawVsQemu(b *testing.B) {
	qimg := oracle.Require(b, "qemu-img")
	dir := b.TempDir()
	src := filepath.Join(dir, "src.qcow2")
	rawIn := filepath.Join(dir, "in.raw")
	rng := rand.New(rand.NewPCG(5, 5))
	data := make([]byte, 64<<20)
	copy(data, fill(rng, 48<<20))
	if err := os.WriteFile(rawIn, data, 0o644); err != nil {
		b.Fatal(err)
	}
	if out, err := exec.Command(qimg, "convert", "-f", "raw", "-O", "qcow2", rawIn, src).CombinedOutput(); err != nil {
		b.Fatalf("%v %s", err, out)
	}
	var ours, theirs time.Duration
	b.SetBytes(int64(len(data)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		dst := filepath.Join(dir, fmt.Sprintf("ours%d.raw", i))
		t0 := time.Now()
		if err := convertToRaw(src, dst); err != nil {
			b.Fatal(err)
		}
		ours += time.Since(t0)
		qdst := filepath.Join(dir, fmt.Sprintf("qemu%d.raw", i))
		t0 = time.Now()
		if out, err := exec.Command(qimg, "convert", "-f", "qcow2", "-O", "raw", src, qdst).CombinedOutput(); err != nil {
			b.Fatalf("%v %s", err, out)
		}
		theirs += time.Since(t0)
		os.Remove(dst)
		os.Remove(qdst)
	}
	b.ReportMetric(float64(ours)/float64(theirs), "ours/qemu")
}

// convertToRaw is the core of `image convert -O raw`: Map for the data
// extents, 1 MiB reads, holes left unwritten.
func convertToRaw(src, dst string) error {
	img, err := Open(src, Options{ReadOnly: true})
	if err != nil {
		return err
	}
	defer img.Close()
	out, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := out.Truncate(img.Size()); err != nil {
		return err
	}
	ext, err := img.Map(0, img.Size())
	if err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for _, x := range ext {
		if x.Kind != image.Data {
			continue
		}
		for off := x.Offset; off < x.Offset+x.Length; off += int64(len(buf)) {
			n := min(int64(len(buf)), x.Offset+x.Length-off)
			if _, err := img.ReadAt(buf[:n], off); err != nil {
				return err
			}
			if _, err := out.WriteAt(buf[:n], off); err != nil {
				return err
			}
		}
	}
	return out.Sync()
}

// BenchmarkAllocWrite4K allocates a 4 KiB cluster per write with the
// ordering syncs off (Scratch), so the CPU cost of allocation (and of the
// overlap checks on it) is what is measured, not fdatasync. A stride of
// 9 clusters spreads the writes over many L2 tables.
func BenchmarkAllocWrite4K(b *testing.B) { benchFirstWrites(b, 4096, 9, Options{Scratch: true}) }

// BenchmarkClassify is the per-request check of an allocated cluster's
// L2 entry (alignment, reserved bits, and that it names no metadata).
func BenchmarkClassify(b *testing.B) {
	img := benchImage(b, 64<<20, 65536)
	defer img.Close()
	img.mu.Lock()
	defer img.mu.Unlock()
	e, err := img.entryLocked(100)
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if k, _, err := img.classify(e, 100); err != nil || k != kNormal {
			b.Fatal(k, err)
		}
	}
}
