package vhd

import (
	"fmt"
	"math/rand"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/blktap-go/blktap/formats/internal/crashfs"
	"github.com/blktap-go/blktap/formats/internal/imagetest"
	"github.com/blktap-go/blktap/internal/oracle"
)

// TestConcurrentWriters: goroutines write interleaved 3 KiB pieces (so
// several race to allocate each block and to set bits in one bitmap
// sector) while others read; every block is allocated once, nothing
// leaks, and every byte lands.
func TestConcurrentWriters(t *testing.T) {
	for _, kind := range []string{"dynamic", "differencing"} {
		t.Run(kind, func(t *testing.T) {
			const size = 6 << 20
			var img *Image
			var f *crashfs.File
			base := make([]byte, size)
			if kind == "differencing" {
				_, parent := memImage(t, CreateOptions{Size: size, BlockSize: 1 << 20}, nil)
				pattern(base, 7)
				parent.WriteAt(base, 0)
				f, img = memChild(t, parent, CreateOptions{Size: size, BlockSize: 1 << 20})
			} else {
				f, img = memImage(t, CreateOptions{Size: size, BlockSize: 1 << 20}, nil)
			}
			const piece, workers = 3000, 8
			model := append([]byte(nil), base...)
			var wg sync.WaitGroup
			for w := 0; w < workers; w++ {
				wg.Add(1)
				go func(w int) {
					defer wg.Done()
					b := make([]byte, piece)
					for off := int64(w * piece); off+piece <= size; off += workers * piece {
						pattern(b, off)
						if _, err := img.WriteAt(b, off); err != nil {
							t.Error(err)
							return
						}
						if _, err := img.ReadAt(make([]byte, 5000), (off*7)%(size-5000)); err != nil {
							t.Error(err)
							return
						}
					}
				}(w)
			}
			wg.Wait()
			b := make([]byte, piece)
			for off := int64(0); off+piece <= size; off += piece {
				pattern(b, off)
				copy(model[off:], b)
			}
			mustEqual(t, "after concurrent writes", readAll(t, img), model)
			res, err := checkFile(f, "x", CheckOptions{})
			if err != nil || !res.OK() || res.LeakedBytes != 0 || res.AllocatedBlocks != 6 {
				t.Fatalf("check: %+v %v", res, err)
			}
		})
	}
}

// TestQemuWritesOverBatmap: qemu knows no batmap and allocates its first
// block over ours; we still read the disk right, never write the batmap
// again, and Check says what happened.
func TestQemuWritesOverBatmap(t *testing.T) {
	qio := oracle.Require(t, "qemu-io")
	p := filepath.Join(t.TempDir(), "b.vhd")
	if err := Create(p, CreateOptions{Size: 8 << 20}); err != nil {
		t.Fatal(err)
	}
	runCmd(t, qio, "-f", "vpc", "-c", "write -P 0x31 4M 64k", p)
	img, err := Open(p, Options{Logger: discardLogger()})
	if err != nil {
		t.Fatal(err)
	}
	if img.Info().Batmap {
		t.Fatal("batmap still trusted after qemu overwrote it")
	}
	if err := img.Discard(4<<20, 4096); err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt([]byte("hello"), 100); err != nil {
		t.Fatal(err)
	}
	want := readAll(t, img)
	img.Close()
	mustEqual(t, "qemu vs us", qemuRaw(t, p), want)
	res, err := Check(p, CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if res.OK() || !strings.Contains(fmt.Sprint(res.Corruptions), "batmap") {
		t.Fatalf("check: %+v", res)
	}
	res, err = Check(p, CheckOptions{Repair: true})
	if err != nil || !res.OK() || len(res.Repaired) != 2 {
		t.Fatalf("repair: %+v %v", res, err)
	}
	img, err = Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if !img.Info().Batmap {
		t.Fatal("batmap not valid after repair")
	}
	mustEqual(t, "after repair", readAll(t, img), want)
	img.Close()
	mustEqual(t, "qemu after repair", qemuRaw(t, p), want)
}

func benchImage(b *testing.B, allocated bool) (*Image, int64) {
	const size = 256 << 20
	p := filepath.Join(b.TempDir(), "bench.vhd")
	if err := Create(p, CreateOptions{Size: size}); err != nil {
		b.Fatal(err)
	}
	img, err := Open(p, Options{})
	if err != nil {
		b.Fatal(err)
	}
	if allocated {
		buf := make([]byte, 2<<20)
		for off := int64(0); off < size; off += int64(len(buf)) {
			if _, err := img.WriteAt(buf, off); err != nil {
				b.Fatal(err)
			}
		}
	}
	return img, size
}

// BenchmarkReadAt4K: random 4 KiB reads of allocated blocks (BAT and
// bitmap lookup plus one pread from the page cache).
func BenchmarkReadAt4K(b *testing.B) {
	img, _ := benchImage(b, true)
	defer img.Close()
	imagetest.Random4K(b, img, 1, false)
}

// BenchmarkLookup: the block lookup alone (BAT entry + cached bitmap).
func BenchmarkLookup(b *testing.B) {
	img, size := benchImage(b, true)
	defer img.Close()
	blocks := size / img.blockSize
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		e, bm, err := img.lookup(int64(i) % blocks)
		if err != nil || e == batUnused || !img.bitTest(bm, 3) {
			b.Fatal("lookup", err)
		}
	}
}

// BenchmarkWriteAt4KAllocated: random 4 KiB overwrites (the fast path).
func BenchmarkWriteAt4KAllocated(b *testing.B) {
	img, _ := benchImage(b, true)
	defer img.Close()
	imagetest.Random4K(b, img, 1, true)
}

// BenchmarkReadAt4KParallel: the lookup path under contention.
func BenchmarkReadAt4KParallel(b *testing.B) {
	img, size := benchImage(b, true)
	defer img.Close()
	b.SetBytes(4096)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		buf := make([]byte, 4096)
		r := rand.New(rand.NewSource(rand.Int63()))
		for pb.Next() {
			if _, err := img.ReadAt(buf, r.Int63n(size/4096)*4096); err != nil {
				b.Fatal(err)
			}
		}
	})
}
