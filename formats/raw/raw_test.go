package raw

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/internal/oracle"
)

const mib = 1 << 20

func newRaw(t *testing.T, size int64) (string, *Image) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.raw")
	if err := Create(p, size); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, Options{URing: testURing})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return p, img
}

// testURing makes newRaw open images with Options.URing (uring_test.go
// runs the tests again with it set).
var testURing bool

func TestCreateNeverOverwrites(t *testing.T) {
	p := filepath.Join(t.TempDir(), "x.raw")
	if err := os.WriteFile(p, []byte("precious"), 0o644); err != nil {
		t.Fatal(err)
	}
	err := Create(p, mib)
	if !errors.Is(err, fs.ErrExist) {
		t.Fatalf("Create over an existing file: got %v, want fs.ErrExist", err)
	}
	if b, _ := os.ReadFile(p); string(b) != "precious" {
		t.Fatalf("existing file changed to %q", b)
	}
	if err := Create(filepath.Join(t.TempDir(), "neg.raw"), -1); err == nil {
		t.Fatal("negative size accepted")
	}
}

func TestCreateIsSparse(t *testing.T) {
	p, img := newRaw(t, 64*mib)
	if img.Size() != 64*mib {
		t.Fatalf("size %d", img.Size())
	}
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != 64*mib {
		t.Fatalf("file size %d", st.Size())
	}
	ext, err := img.Map(0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	want := []image.Extent{{Offset: 0, Length: 64 * mib, Kind: image.Hole}}
	if fmt.Sprint(ext) != fmt.Sprint(want) {
		t.Fatalf("map of a new image: %v, want %v", ext, want)
	}
}

func TestReadWriteRange(t *testing.T) {
	_, img := newRaw(t, mib)
	buf := bytes.Repeat([]byte{0xa5}, 4096)
	if _, err := img.WriteAt(buf, mib-4096); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if _, err := img.ReadAt(got, mib-4096); err != nil || !bytes.Equal(got, buf) {
		t.Fatalf("read back: %v", err)
	}
	for _, off := range []int64{mib - 4095, mib, -1} {
		if _, err := img.WriteAt(buf, off); !errors.Is(err, image.ErrOutOfRange) {
			t.Errorf("write at %d: %v, want ErrOutOfRange", off, err)
		}
		if _, err := img.ReadAt(got, off); !errors.Is(err, image.ErrOutOfRange) {
			t.Errorf("read at %d: %v, want ErrOutOfRange", off, err)
		}
	}
	if n, err := img.ReadAt(nil, mib); n != 0 || err != nil {
		t.Errorf("empty read at the end: %d %v", n, err)
	}
	for _, r := range [][2]int64{{0, mib + 1}, {-1, 1}, {1, -1}, {mib, 1}} {
		if err := img.Discard(r[0], r[1]); !errors.Is(err, image.ErrOutOfRange) {
			t.Errorf("discard %v: %v", r, err)
		}
		if _, err := img.Map(r[0], r[1]); !errors.Is(err, image.ErrOutOfRange) {
			t.Errorf("map %v: %v", r, err)
		}
	}
}

func TestShrunkFileIsNotEOF(t *testing.T) {
	p, img := newRaw(t, mib)
	if err := os.Truncate(p, 4096); err != nil {
		t.Fatal(err)
	}
	_, err := img.ReadAt(make([]byte, 8192), 0)
	if err == nil || errors.Is(err, os.ErrNotExist) {
		t.Fatalf("short read after shrink: %v", err)
	}
	if err.Error() == "EOF" {
		t.Fatalf("bare io.EOF inside the size")
	}
}

func TestReadOnly(t *testing.T) {
	p, img := newRaw(t, mib)
	if _, err := img.WriteAt([]byte("hello"), 100); err != nil {
		t.Fatal(err)
	}
	img.Close()
	ro, err := Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if _, err := ro.WriteAt([]byte("x"), 0); !errors.Is(err, image.ErrReadOnly) {
		t.Errorf("write: %v", err)
	}
	if err := ro.Discard(0, 4096); !errors.Is(err, image.ErrReadOnly) {
		t.Errorf("discard: %v", err)
	}
	if err := ro.Flush(); err != nil {
		t.Errorf("flush: %v", err)
	}
	got := make([]byte, 5)
	if _, err := ro.ReadAt(got, 100); err != nil || string(got) != "hello" {
		t.Errorf("read %q %v", got, err)
	}
	// The descriptor itself is read-only, not just the wrapper.
	if _, err := ro.f.WriteAt([]byte("x"), 0); err == nil {
		t.Error("read-only image has a writable descriptor")
	}
}

func TestClosed(t *testing.T) {
	_, img := newRaw(t, mib)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); !errors.Is(err, image.ErrClosed) {
		t.Errorf("second close: %v", err)
	}
	if _, err := img.ReadAt(make([]byte, 1), 0); !errors.Is(err, image.ErrClosed) {
		t.Errorf("read: %v", err)
	}
	if _, err := img.WriteAt(make([]byte, 1), 0); !errors.Is(err, image.ErrClosed) {
		t.Errorf("write: %v", err)
	}
	if err := img.Flush(); !errors.Is(err, image.ErrClosed) {
		t.Errorf("flush: %v", err)
	}
	if _, err := img.Map(0, 1); !errors.Is(err, image.ErrClosed) {
		t.Errorf("map: %v", err)
	}
}

func TestOpenRefusesNonImages(t *testing.T) {
	if _, err := Open(t.TempDir(), Options{ReadOnly: true}); !errors.Is(err, image.ErrWrongFormat) {
		t.Errorf("directory: %v", err)
	}
	if _, err := Open("/dev/null", Options{ReadOnly: true}); !errors.Is(err, image.ErrWrongFormat) {
		t.Errorf("char device: %v", err)
	}
	if _, err := Open(filepath.Join(t.TempDir(), "missing"), Options{}); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing: %v", err)
	}
}

// Many goroutines write disjoint 4 KiB blocks, read their own back, flush,
// discard and map at once; run with -race.
func TestConcurrent(t *testing.T) {
	const blocks, workers = 256, 8
	_, img := newRaw(t, blocks*4096)
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 1))
			buf := make([]byte, 4096)
			got := make([]byte, 4096)
			for i := 0; i < 200; i++ {
				b := int64(r.IntN(blocks/workers)*workers + w) // this worker's blocks only
				for j := range buf {
					buf[j] = byte(w) ^ byte(i) ^ byte(j)
				}
				if _, err := img.WriteAt(buf, b*4096); err != nil {
					errs <- err
					return
				}
				if _, err := img.ReadAt(got, b*4096); err != nil || !bytes.Equal(got, buf) {
					errs <- fmt.Errorf("worker %d block %d: read back differs (%v)", w, b, err)
					return
				}
				switch i % 50 {
				case 0:
					if err := img.Flush(); err != nil {
						errs <- err
						return
					}
				case 1:
					if _, err := img.Map(0, img.Size()); err != nil {
						errs <- err
						return
					}
				case 2:
					if err := img.Discard(b*4096, 4096); err != nil {
						errs <- err
						return
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// qemuMap runs `qemu-img map --output=json` on a raw file and returns its
// extents as data/hole runs.
func qemuMap(t *testing.T, qimg, path string) []image.Extent {
	t.Helper()
	out, err := exec.Command(qimg, "map", "-f", "raw", "--output=json", path).Output()
	if err != nil {
		t.Fatalf("qemu-img map: %v", err)
	}
	var ents []struct {
		Start, Length int64
		Data, Zero    bool
	}
	if err := json.Unmarshal(out, &ents); err != nil {
		t.Fatalf("qemu-img map output: %v\n%s", err, out)
	}
	var res []image.Extent
	for _, e := range ents {
		k := image.Data
		if !e.Data {
			k = image.Hole
		}
		if n := len(res); n > 0 && res[n-1].Kind == k {
			res[n-1].Length += e.Length
			continue
		}
		res = append(res, image.Extent{Offset: e.Start, Length: e.Length, Kind: k})
	}
	return res
}

func TestMapMatchesQemuImg(t *testing.T) {
	qimg := oracle.Require(t, "qemu-img")
	p, img := newRaw(t, 16*mib)
	data := bytes.Repeat([]byte{0x5a}, 64*1024)
	for _, off := range []int64{0, 3 * mib, 3*mib + 64*1024, 9 * mib, 16*mib - 64*1024} {
		if _, err := img.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
	}
	// Punch a hole in the middle of the first run; qemu-img must see it.
	if err := img.Discard(3*mib+32*1024, 64*1024); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	ours, err := img.Map(0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	theirs := qemuMap(t, qimg, p)
	if fmt.Sprint(ours) != fmt.Sprint(theirs) {
		t.Fatalf("map differs\n ours:     %v\n qemu-img: %v", ours, theirs)
	}
	var sawPunch bool
	for _, e := range theirs {
		if e.Kind == image.Hole && e.Offset <= 3*mib+32*1024 && e.Offset+e.Length >= 3*mib+96*1024 {
			sawPunch = true
		}
	}
	if !sawPunch {
		t.Fatalf("punched hole not visible to qemu-img: %v", theirs)
	}
	got := make([]byte, 64*1024)
	if _, err := img.ReadAt(got, 3*mib+32*1024); err != nil || !bytes.Equal(got, make([]byte, len(got))) {
		t.Fatalf("discarded range does not read as zeros (%v)", err)
	}
	// A sub-range starts and ends exactly where asked.
	sub, err := img.Map(3*mib+1000, 200*1024)
	if err != nil {
		t.Fatal(err)
	}
	if sub[0].Offset != 3*mib+1000 || sub[len(sub)-1].Offset+sub[len(sub)-1].Length != 3*mib+1000+200*1024 {
		t.Fatalf("sub-range map %v", sub)
	}
}

// What we write, qemu-io reads; what qemu-io writes, we read; qemu-img
// compare agrees the two files are equal.
func TestQemuInterop(t *testing.T) {
	qio := oracle.Require(t, "qemu-io")
	qimg := oracle.Require(t, "qemu-img")
	p, img := newRaw(t, 8*mib)
	if _, err := img.WriteAt(bytes.Repeat([]byte{0xa5}, 2*mib), 1*mib); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) {
		t.Helper()
		out, err := exec.Command(qio, args...).CombinedOutput()
		if err != nil || bytes.Contains(out, []byte("Pattern verification failed")) {
			t.Fatalf("qemu-io %v: %v\n%s", args, err, out)
		}
	}
	run("-f", "raw", "-r", "-c", "read -P 0xa5 1M 2M", "-c", "read -P 0 0 1M", p)
	run("-f", "raw", "-c", "write -P 0x3c 5M 1M", p)
	got := make([]byte, mib)
	if _, err := img.ReadAt(got, 5*mib); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{0x3c}, mib)) {
		t.Fatalf("our read of qemu-io's write differs (%v)", err)
	}

	ref := filepath.Join(t.TempDir(), "ref.raw")
	if out, err := exec.Command(qimg, "create", "-f", "raw", ref, "8M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	run("-f", "raw", "-c", "write -P 0xa5 1M 2M", "-c", "write -P 0x3c 5M 1M", ref)
	if out, err := exec.Command(qimg, "compare", "-f", "raw", "-F", "raw", p, ref).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare: %v\n%s", err, out)
	}
	// And compare must notice a difference we make.
	if _, err := img.WriteAt([]byte{1}, 7*mib); err != nil {
		t.Fatal(err)
	}
	if err := exec.Command(qimg, "compare", "-f", "raw", "-F", "raw", p, ref).Run(); err == nil {
		t.Fatal("qemu-img compare found no difference after a write")
	}
}

func BenchmarkReadAt4k(b *testing.B) {
	p := filepath.Join(b.TempDir(), "bench.raw")
	if err := Create(p, 64*mib); err != nil {
		b.Fatal(err)
	}
	img, err := Open(p, Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer img.Close()
	buf := make([]byte, 4096)
	for i := int64(0); i < 64*mib; i += 4096 {
		img.WriteAt(buf, i)
	}
	b.SetBytes(4096)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		buf := make([]byte, 4096)
		var off int64
		for pb.Next() {
			if _, err := img.ReadAt(buf, off); err != nil {
				b.Error(err)
				return
			}
			off = (off + 4096*7) % (64 * mib)
		}
	})
}

// A block device: size from BLKGETSIZE64, whole-range Data map, and a
// discard that reads back as zeros. Needs root and a free loop device.
func TestBlockDevice(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a loop device")
	}
	losetup, err := exec.LookPath("losetup")
	if err != nil {
		t.Skip("no losetup")
	}
	p, img := newRaw(t, 8*mib)
	pattern := bytes.Repeat([]byte{0xc3}, 8*mib)
	if _, err := img.WriteAt(pattern, 0); err != nil {
		t.Fatal(err)
	}
	img.Close()
	out, err := exec.Command(losetup, "-f", "--show", p).Output()
	if err != nil {
		t.Skipf("no loop device available: %v", err)
	}
	dev := string(bytes.TrimSpace(out))
	t.Cleanup(func() { exec.Command(losetup, "-d", dev).Run() })

	bd, err := Open(dev, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer bd.Close()
	if !bd.blockDev || bd.Size() != 8*mib {
		t.Fatalf("block device %s: blockDev %v size %d", dev, bd.blockDev, bd.Size())
	}
	got := make([]byte, mib)
	if _, err := bd.ReadAt(got, 7*mib); err != nil || !bytes.Equal(got, pattern[:mib]) {
		t.Fatalf("read through %s: %v", dev, err)
	}
	ext, err := bd.Map(0, bd.Size())
	if err != nil || len(ext) != 1 || ext[0].Kind != image.Data || ext[0].Length != 8*mib {
		t.Fatalf("map %v %v", ext, err)
	}
	switch err := bd.Discard(mib, mib); {
	case err == nil:
		if _, err := bd.ReadAt(got, mib); err != nil || !bytes.Equal(got, make([]byte, mib)) {
			t.Fatalf("discarded range on %s does not read as zeros (%v)", dev, err)
		}
	case errors.Is(err, image.ErrUnsupported):
		t.Logf("%s cannot discard to zeros: %v", dev, err)
	default:
		t.Fatalf("discard: %v", err)
	}
	if _, err := bd.WriteAt(pattern[:4096], 8*mib-4096); err != nil {
		t.Fatal(err)
	}
	if _, err := bd.WriteAt(pattern[:4096], 8*mib-4095); !errors.Is(err, image.ErrOutOfRange) {
		t.Fatalf("write past the device end: %v", err)
	}
	if err := bd.Flush(); err != nil {
		t.Fatal(err)
	}
}

// Reads racing with Close either succeed or fail with ErrClosed.
func TestCloseRacesIO(t *testing.T) {
	_, img := newRaw(t, mib)
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Go(func() {
			buf := make([]byte, 4096)
			for i := 0; ; i++ {
				_, err := img.ReadAt(buf, int64(i%256)*4096)
				if err == nil {
					switch i % 3 {
					case 0:
						err = img.Flush()
					case 1:
						_, err = img.Map(0, mib)
					case 2:
						err = img.Discard(0, 4096)
					}
				}
				if err != nil {
					if !errors.Is(err, image.ErrClosed) {
						errs <- err
					}
					return
				}
			}
		})
	}
	img.Close()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("I/O racing Close: %v (want ErrClosed)", err)
	}
}
