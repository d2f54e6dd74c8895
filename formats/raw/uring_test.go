package raw

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/internal/oracle"
)

// needURing fails under CI unless the runner declares io_uring off
// (BLKTAP_NO_URING), so the uring path cannot silently go untested.
func needURing(t *testing.T) {
	t.Helper()
	oracle.RequireURing(t, URingSupported())
}

// The image tests again, every read and write through io_uring.
func TestURingImage(t *testing.T) {
	needURing(t)
	testURing = true
	defer func() { testURing = false }()
	_, img := newRaw(t, mib)
	if img.rings == nil {
		t.Fatal("Options.URing opened an image without rings")
	}
	for name, fn := range map[string]func(*testing.T){
		"ReadWriteRange": TestReadWriteRange, "ShrunkFileIsNotEOF": TestShrunkFileIsNotEOF,
		"Concurrent": TestConcurrent, "QemuInterop": TestQemuInterop, "CloseRacesIO": TestCloseRacesIO,
		"Batch": TestBatchQemuIO,
	} {
		t.Run(name, fn)
	}
}

// Batch writes land where qemu-io reads them, and Batch reads what qemu-io
// wrote, in one call mixing reads, writes and bad ops; each op gets its
// own error and a bad one spoils no other.
func TestBatchQemuIO(t *testing.T) {
	qio := oracle.Require(t, "qemu-io")
	p, img := newRaw(t, 8*mib)
	run := func(args ...string) {
		t.Helper()
		out, err := exec.Command(qio, args...).CombinedOutput()
		if err != nil || bytes.Contains(out, []byte("Pattern verification failed")) {
			t.Fatalf("qemu-io %v: %v\n%s", args, err, out)
		}
	}
	run("-f", "raw", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 4M 1M", p)
	ops := []image.BatchOp{
		{Buf: make([]byte, 64<<10)},
		{Buf: make([]byte, mib), Off: 4 * mib},
		{Write: true, Buf: bytes.Repeat([]byte{0x33}, 128<<10), Off: 2 * mib},
		{Buf: make([]byte, 4096), Off: 8*mib - 512}, // past the end
	}
	for i := range 40 {
		ops = append(ops, image.BatchOp{Write: true, Buf: bytes.Repeat([]byte{byte(0x40 + i)}, 4096), Off: 6*mib + int64(i)*4096})
	}
	img.Batch(ops)
	for i, op := range ops {
		want := error(nil)
		if i == 3 {
			want = image.ErrOutOfRange
		}
		if !errors.Is(op.Err, want) || (want == nil && op.Err != nil) {
			t.Fatalf("op %d: %v, want %v", i, op.Err, want)
		}
	}
	if !bytes.Equal(ops[0].Buf, bytes.Repeat([]byte{0x11}, 64<<10)) || !bytes.Equal(ops[1].Buf, bytes.Repeat([]byte{0x22}, mib)) {
		t.Fatal("batch read differs from what qemu-io wrote")
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	args := []string{"-f", "raw", "-r", "-c", "read -P 0x33 2M 128k", "-c", "read -P 0 2176k 64k"}
	for i := range 40 {
		args = append(args, "-c", fmt.Sprintf("read -P %#x %d 4k", 0x40+i, 6*mib+i*4096))
	}
	run(append(args, p)...)
	// A read-only image refuses the batch's writes and still does its reads.
	ro, err := Open(p, Options{ReadOnly: true, URing: testURing})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	rops := []image.BatchOp{{Write: true, Buf: make([]byte, 512)}, {Buf: make([]byte, 512)}}
	ro.Batch(rops)
	if !errors.Is(rops[0].Err, image.ErrReadOnly) || rops[1].Err != nil || rops[1].Buf[0] != 0x11 {
		t.Fatalf("read-only batch: %v, %v", rops[0].Err, rops[1].Err)
	}
}

// BenchmarkBatch is a ring batch's I/O on a cached image: qd ops of size
// bytes at random aligned offsets, as one Batch. "threads" is the image
// without rings (one pread/pwrite after another, as the ring loop does
// them), "uring" one io_uring submission for the lot.
func BenchmarkBatch(b *testing.B) {
	const size = benchSize
	forEngines(b, func(engine string, img *Image) {
		for _, c := range []struct {
			name   string
			bs, qd int
			write  bool
		}{
			{"4k-qd1-read", 4096, 1, false}, {"4k-qd32-read", 4096, 32, false},
			{"4k-qd1-write", 4096, 1, true}, {"4k-qd32-write", 4096, 32, true},
			{"1M-qd8-read", mib, 8, false}, {"1M-qd8-write", mib, 8, true},
		} {
			b.Run(engine+"/"+c.name, func(b *testing.B) {
				ops := make([]image.BatchOp, c.qd)
				for i := range ops {
					ops[i].Buf, ops[i].Write = make([]byte, c.bs), c.write
				}
				r := rand.New(rand.NewPCG(1, 2))
				b.SetBytes(int64(c.bs * c.qd))
				for b.Loop() {
					for i := range ops {
						ops[i].Off = r.Int64N(size/int64(c.bs)) * int64(c.bs)
					}
					img.Batch(ops)
					if ops[0].Err != nil {
						b.Fatal(ops[0].Err)
					}
				}
			})
		}
	})
}

// BenchmarkSingle is the NBD export's path: one ReadAt or WriteAt per
// request, from parallel goroutines (as the export's workers call it).
func BenchmarkSingle(b *testing.B) {
	const size = benchSize
	forEngines(b, func(engine string, img *Image) {
		for _, c := range []struct {
			name  string
			bs    int
			write bool
		}{{"4k-read", 4096, false}, {"4k-write", 4096, true}, {"1M-read", mib, false}, {"1M-write", mib, true}} {
			b.Run(engine+"/"+c.name, func(b *testing.B) {
				b.SetBytes(int64(c.bs))
				b.RunParallel(func(pb *testing.PB) {
					buf := make([]byte, c.bs)
					r := rand.New(rand.NewPCG(rand.Uint64(), 2))
					for pb.Next() {
						off := r.Int64N(size/int64(c.bs)) * int64(c.bs)
						var err error
						if c.write {
							_, err = img.WriteAt(buf, off)
						} else {
							_, err = img.ReadAt(buf, off)
						}
						if err != nil {
							b.Error(err)
							return
						}
					}
				})
			})
		}
	})
}

const benchSize = 64 * mib

// benchFile makes a raw image of benchSize with every block written, so
// the benchmarks read data in the page cache, never holes.
func benchFile(b *testing.B) string {
	p := filepath.Join(b.TempDir(), "bench.raw")
	if err := Create(p, benchSize); err != nil {
		b.Fatal(err)
	}
	fill, err := Open(p, Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer fill.Close()
	for off := int64(0); off < benchSize; off += mib {
		if _, err := fill.WriteAt(bytes.Repeat([]byte{1}, mib), off); err != nil {
			b.Fatal(err)
		}
	}
	return p
}

// forEngines runs fn on a benchFile image opened each way.
func forEngines(b *testing.B, fn func(engine string, img *Image)) {
	p := benchFile(b)
	for _, engine := range []string{"threads", "uring"} {
		img, err := Open(p, Options{URing: engine == "uring"})
		if err != nil {
			b.Fatal(err)
		}
		if engine == "uring" && img.rings == nil {
			img.Close()
			b.Skip("io_uring unavailable")
		}
		fn(engine, img)
		img.Close()
	}
}
