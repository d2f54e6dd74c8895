package nbd

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/imagetest"
	"github.com/blktap-go/blktap/internal/oracle"
)

// TestQemuNBDRoundTrip writes through qemu-nbd and checks the file the
// server serves, reads what qemu-io put in the file, and compares Map
// with qemu-img map of the same file.
func TestQemuNBDRoundTrip(t *testing.T) {
	qimg := oracle.Require(t, "qemu-img")
	qio := oracle.Require(t, "qemu-io")
	const size = 16 << 20
	file := filepath.Join(t.TempDir(), "disk.raw")
	if out, err := exec.Command(qimg, "create", "-f", "raw", file, strconv.Itoa(size)).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	if out, err := exec.Command(qio, "-f", "raw", "-c", "write -P 0x5a 1M 64K", file).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io: %v\n%s", err, out)
	}
	srv := qemuNBD(t, file)
	img := mustOpen(t, srv.uri(""), Options{})
	if img.Size() != size {
		t.Fatalf("size %d, want %d", img.Size(), size)
	}
	got := make([]byte, 64<<10)
	if _, err := img.ReadAt(got, 1<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, bytes.Repeat([]byte{0x5a}, 64<<10)) {
		t.Fatal("qemu-io's pattern does not read back through the client")
	}
	want, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	writes := []struct {
		off int64
		n   int
	}{{12345, 7777}, {4 << 20, 1 << 20}, {size - 4096, 4096}, {8<<20 + 1, 300000}}
	var wg sync.WaitGroup
	for i, w := range writes {
		p := imagetest.Pattern(uint64(i), w.n)
		copy(want[w.off:], p)
		wg.Go(func() {
			if _, err := img.WriteAt(p, w.off); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if err := img.Discard(4<<20+64<<10, 128<<10); err != nil {
		t.Fatalf("discard: %v", err)
	}
	clear(want[4<<20+64<<10 : 4<<20+192<<10])
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	onDisk, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if i := imagetest.FirstDiff(onDisk, want); i >= 0 {
		t.Fatalf("file differs from what was written at byte %d", i)
	}
	back := make([]byte, size)
	if _, err := img.ReadAt(back, 0); err != nil {
		t.Fatal(err)
	}
	if i := imagetest.FirstDiff(back, want); i >= 0 {
		t.Fatalf("read back differs at byte %d", i)
	}
	if _, err := img.ReadAt(make([]byte, 2), size-1); !errors.Is(err, image.ErrOutOfRange) {
		t.Fatalf("read past the end: %v", err)
	}
	compareQemuImgMap(t, qimg, file, img, size)
}

// compareQemuImgMap compares img's Map with qemu-img map of the file it
// serves.
func compareQemuImgMap(t *testing.T, qimg, file string, img *Image, size int64) {
	out, err := exec.Command(qimg, "map", "--output=json", "-f", "raw", file).Output()
	if err != nil {
		t.Fatalf("qemu-img map: %v", err)
	}
	var qm []struct {
		Start, Length int64
		Data, Zero    bool
	}
	if err := json.Unmarshal(out, &qm); err != nil {
		t.Fatal(err)
	}
	ext, err := img.Map(0, size)
	if err != nil {
		t.Fatal(err)
	}
	comparePages(t, size, ext, func(set func(off, n int64, data bool)) {
		for _, e := range qm {
			set(e.Start, e.Length, e.Data)
		}
	}, string(out))
}

// compareNbdinfoMap compares img's Map with nbdinfo --map of uri, a
// second client of the same server.
func compareNbdinfoMap(t *testing.T, ninfo, uri string, img *Image, size int64) {
	ext, err := img.Map(0, size)
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(ninfo, "--map", uri[len("nbd:"):]).Output()
	if err != nil {
		t.Fatalf("nbdinfo --map: %v", err)
	}
	comparePages(t, size, ext, func(set func(off, n int64, data bool)) {
		sc := bufio.NewScanner(bytes.NewReader(out))
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) < 3 {
				continue
			}
			off, _ := strconv.ParseInt(f[0], 10, 64)
			n, _ := strconv.ParseInt(f[1], 10, 64)
			typ, _ := strconv.Atoi(f[2])
			set(off, n, typ&1 == 0) // bit 0 = hole
		}
	}, string(out))
}

// comparePages compares our Map with an oracle's, page by page, on one
// question: is the page data (allocated) or not.
func comparePages(t *testing.T, size int64, ext []image.Extent, oracleMap func(set func(off, n int64, data bool)), raw string) {
	t.Helper()
	want := make([]bool, size/4096)
	oracleMap(func(off, n int64, data bool) {
		for p := off / 4096; p < (off+n)/4096 && p < int64(len(want)); p++ {
			want[p] = data
		}
	})
	got := make([]bool, size/4096)
	imagetest.Tiles(t, ext, size)
	for _, e := range ext {
		for p := e.Offset / 4096; p < (e.Offset+e.Length)/4096; p++ {
			got[p] = e.Kind == image.Data
		}
	}
	sawData, sawHole := false, false
	for p := range want {
		if got[p] != want[p] {
			t.Fatalf("page %d: ours data=%v, oracle data=%v\nours: %+v\noracle: %s", p, got[p], want[p], ext, raw)
		}
		sawData = sawData || want[p]
		sawHole = sawHole || !want[p]
	}
	if !sawData || !sawHole {
		t.Fatalf("the test image should have both data and holes: %s", raw)
	}
}

// TestNbdkitMemory: round trips on nbdkit's memory plugin, a read larger
// than the maximum payload, concurrent I/O, and Map against nbdinfo --map
// (libnbd, a second client) on the same server.
func TestNbdkitMemory(t *testing.T) {
	ninfo := oracle.Require(t, "nbdinfo")
	const size = 64 << 20
	srv := nbdkit(t, "memory", "64M")
	img := mustOpen(t, srv.uri(""), Options{})
	want := make([]byte, size)
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := range 8 {
				off := int64(w*8+i) * (512 << 10)
				if i%3 == 0 {
					continue // leave holes
				}
				p := imagetest.Pattern(uint64(w*8+i), 64<<10+i*512)
				copy(want[off:], p)
				if _, err := img.WriteAt(p, off); err != nil {
					t.Error(err)
					return
				}
				got := make([]byte, len(p))
				if _, err := img.ReadAt(got, off); err != nil || !bytes.Equal(got, p) {
					t.Errorf("read back at %d: %v", off, err)
					return
				}
			}
		})
	}
	wg.Wait()
	// 40 MiB: more than the 32 MiB maximum payload, so split.
	big := make([]byte, 40<<20)
	if _, err := img.ReadAt(big, 8<<20); err != nil {
		t.Fatal(err)
	}
	if i := imagetest.FirstDiff(big, want[8<<20:48<<20]); i >= 0 {
		t.Fatalf("big read differs at %d", i)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	compareNbdinfoMap(t, ninfo, srv.uri(""), img, size)
	// Discard is WRITE_ZEROES: zeros afterwards, and nbdkit's memory
	// plugin frees the pages, so the map shows a hole.
	if err := img.Discard(1<<20, 512<<10); err != nil {
		t.Fatal(err)
	}
	z := make([]byte, 512<<10)
	img.ReadAt(z, 1<<20)
	if !bytes.Equal(z, make([]byte, len(z))) {
		t.Fatal("discarded range does not read as zeros")
	}
	m, err := img.Map(1<<20, 512<<10)
	if err != nil || len(m) != 1 || m[0].Kind != image.Hole {
		t.Fatalf("map of the discarded range: %+v %v", m, err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := img.ReadAt(z, 0); !errors.Is(err, image.ErrClosed) {
		t.Fatalf("read after close: %v", err)
	}
}

// TestNbdkitFeatureless: without structured replies Map says Data and
// reads arrive as simple replies; without WRITE_ZEROES Discard is
// unsupported; a read-only export needs ReadOnly.
func TestNbdkitFeatureless(t *testing.T) {
	srv := nbdkit(t, "--no-sr", "--filter=nozero", "memory", "1M")
	img := mustOpen(t, srv.uri(""), Options{})
	p := imagetest.Pattern(3, 100000)
	if _, err := img.WriteAt(p, 4321); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(p))
	if _, err := img.ReadAt(got, 4321); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("read back: %v", err)
	}
	m, err := img.Map(0, 1<<20)
	if err != nil || len(m) != 1 || m[0].Kind != image.Data || m[0].Length != 1<<20 {
		t.Fatalf("map without block status: %+v %v", m, err)
	}
	if err := img.Discard(0, 4096); !errors.Is(err, image.ErrUnsupported) {
		t.Fatalf("discard without WRITE_ZEROES: %v", err)
	}

	ro := nbdkit(t, "-r", "memory", "1M")
	if _, err := Open(ro.uri(""), Options{}); !errors.Is(err, image.ErrReadOnly) {
		t.Fatalf("writable open of a read-only export: %v", err)
	}
	r := mustOpen(t, ro.uri(""), Options{ReadOnly: true})
	if _, err := r.WriteAt([]byte{1}, 0); !errors.Is(err, image.ErrReadOnly) {
		t.Fatalf("write on read-only: %v", err)
	}
	if _, err := r.ReadAt(got[:4096], 0); err != nil {
		t.Fatal(err)
	}
}

// TestNbdkitErrors: the server's errors reach the caller as errnos.
func TestNbdkitErrors(t *testing.T) {
	srv := nbdkit(t, "--filter=error", "memory", "1M", "error-pread=ENOSPC", "error-pread-rate=100%",
		"error-pwrite=EPERM", "error-pwrite-rate=100%")
	img := mustOpen(t, srv.uri(""), Options{})
	_, err := img.ReadAt(make([]byte, 4096), 0)
	var se *ServerError
	if !errors.Is(err, unix.ENOSPC) || !errors.As(err, &se) {
		t.Fatalf("read error: %v, want ENOSPC from the server", err)
	}
	if _, err := img.WriteAt(make([]byte, 4096), 0); !errors.Is(err, unix.EPERM) {
		t.Fatalf("write error: %v, want EPERM", err)
	}
	// The connection survives request errors.
	if _, err := img.Map(0, 1<<20); err != nil {
		t.Fatal(err)
	}
}

// TestTimeoutThenRecover: a server that sits on reads makes them fail
// with ErrTimeout/EIO after the deadline; the client reconnects and
// other requests work.
func TestTimeoutThenRecover(t *testing.T) {
	srv := nbdkit(t, "--filter=delay", "memory", "1M", "delay-read=10")
	img := mustOpen(t, srv.uri(""), Options{Timeout: 300 * time.Millisecond})
	_, err := img.ReadAt(make([]byte, 4096), 0)
	if !errors.Is(err, ErrTimeout) || !isEIO(err) {
		t.Fatalf("slow read: %v, want ErrTimeout and EIO", err)
	}
	if _, err := img.WriteAt([]byte("after"), 100); err != nil {
		t.Fatalf("write after a timeout: %v", err)
	}
	if err := img.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
}

func TestExportNotFound(t *testing.T) {
	srv := nbdkit(t, "memory", "1M") // nbdkit serves every name by default
	img := mustOpen(t, srv.uri("any-name"), Options{})
	if img.Size() != 1<<20 {
		t.Fatal(img.Size())
	}
	qfile := filepath.Join(t.TempDir(), "x.raw")
	os.WriteFile(qfile, make([]byte, 1<<20), 0o644)
	q := qemuNBD(t, qfile) // qemu-nbd serves only its one export, named ""
	_, err := Open(q.uri("missing"), Options{})
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("unknown export: %v", err)
	}
}
