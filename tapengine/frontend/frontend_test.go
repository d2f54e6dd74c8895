package frontend

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/internal/parallel"
	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/local"
	"github.com/blktap-go/blktap/tapengine/ring"
)

// fileImage is a minimal raw image.Image over an *os.File, for tests only
// (formats/raw is the real one).
type fileImage struct {
	f       *os.File
	size    int64
	ro      bool
	flushes atomic.Int64
	failAt  atomic.Int64 // a read or write touching this offset fails (0 = never)
	delay   atomic.Int64 // each read sleeps this long (ns) first
}

func newFileImage(t testing.TB, size int64) *fileImage {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "disk.raw"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return &fileImage{f: f, size: size}
}

func (m *fileImage) hits(p []byte, off int64) bool {
	a := m.failAt.Load()
	return a != 0 && a >= off && a < off+int64(len(p))
}

func (m *fileImage) ReadAt(p []byte, off int64) (int, error) {
	if err := image.CheckRange(off, len(p), m.size); err != nil {
		return 0, err
	}
	if m.hits(p, off) {
		return 0, fmt.Errorf("injected: %w", syscall.EIO)
	}
	time.Sleep(time.Duration(m.delay.Load()))
	return m.f.ReadAt(p, off)
}

func (m *fileImage) WriteAt(p []byte, off int64) (int, error) {
	if m.ro {
		return 0, image.ErrReadOnly
	}
	if err := image.CheckRange(off, len(p), m.size); err != nil {
		return 0, err
	}
	if m.hits(p, off) {
		return 0, fmt.Errorf("injected: %w", syscall.EIO)
	}
	return m.f.WriteAt(p, off)
}

func (m *fileImage) Size() int64 { return m.size }
func (m *fileImage) Flush() error {
	m.flushes.Add(1)
	return unix.Fdatasync(int(m.f.Fd()))
}
func (m *fileImage) Discard(off, n int64) error {
	if err := image.CheckRange(off, int(n), m.size); err != nil {
		return err
	}
	return unix.Fallocate(int(m.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}
func (m *fileImage) Map(off, n int64) ([]image.Extent, error) {
	return []image.Extent{{Offset: off, Length: n, Kind: image.Data}}, nil
}
func (m *fileImage) Close() error { return nil }

// passFDs sends fds over a unix socketpair with SCM_RIGHTS and returns the
// received copies, as the daemon hands them to a worker process.
func passFDs(t testing.TB, fds ...int) []int {
	t.Helper()
	sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(sp[0])
	defer unix.Close(sp[1])
	if err := unix.Sendmsg(sp[0], []byte("fds"), unix.UnixRights(fds...), nil, 0); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8)
	oob := make([]byte, unix.CmsgSpace(4*len(fds)))
	_, oobn, _, _, err := unix.Recvmsg(sp[1], buf, oob, unix.MSG_CMSG_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		t.Fatalf("control messages: %v %d", err, len(msgs))
	}
	got, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(got) != len(fds) {
		t.Fatalf("rights: %v %v", got, err)
	}
	for i := range got {
		if got[i] == fds[i] {
			t.Fatalf("fd %d came back as itself: not a real pass", fds[i])
		}
	}
	return got
}

type rig struct {
	f     *Frontend
	img   *fileImage
	stats *ring.Stats
	done  chan error
	stop  context.CancelFunc
}

// newRig connects a frontend to ring.Serve over the local transport, the
// fds passed through a real SCM_RIGHTS round trip.
func newRig(t testing.TB, proto blkif.Protocol, order int, size int64, ropts ring.Options) *rig {
	t.Helper()
	return newRigOpts(t, Options{Protocol: proto, RingOrder: order}, size, ropts)
}

// newRigOpts is newRig with frontend options; the frontend is told the
// features the backend's options publish, as the reconciler would.
func newRigOpts(t testing.TB, fopts Options, size int64, ropts ring.Options) *rig {
	t.Helper()
	proto := fopts.Protocol
	f, err := New(fopts)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.SetFeatures(Features{Discard: ropts.Discard, MaxIndirectSegments: ropts.MaxIndirectSegments}); err != nil {
		t.Fatal(err)
	}
	memfd, kick, notify := f.BackendFDs()
	fds := passFDs(t, memfd, kick, notify)
	tr, err := local.Attach(fds[0], f.RingRefs(), fds[1], fds[2])
	if err != nil {
		t.Fatal(err)
	}
	r := &rig{f: f, img: newFileImage(t, size), stats: new(ring.Stats), done: make(chan error, 1)}
	ropts.Stats = r.stats
	ctx, cancel := context.WithCancel(context.Background())
	r.stop = cancel
	go func() {
		r.done <- ring.Serve(ctx, tr, proto, r.img, ropts)
		tr.Close()
	}()
	if err := f.Connect(uint64(size)/512, 512, ropts.ReadOnly); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.shutdown(t) })
	return r
}

func (r *rig) shutdown(t testing.TB) {
	if r.stop == nil {
		return
	}
	r.stop()
	r.stop = nil
	if err := <-r.done; err != nil {
		t.Errorf("Serve: %v", err)
	}
	if err := r.f.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}

// TestEndToEnd: many goroutines do random, partly unaligned reads and
// writes through the frontend; each owns a region, keeps a model of it,
// and checks every read; at the end the image file must equal the models.
func TestEndToEnd(t *testing.T) {
	for _, c := range []struct {
		proto    blkif.Protocol
		order    int
		indirect int
		workers  int
	}{{blkif.X86_32, 0, 0, 0}, {blkif.X86_64, 0, 0, 0}, {blkif.X86_64, 2, 0, 0}, {blkif.ARM, 1, 0, 0},
		{blkif.X86_32, 0, 64, 0}, {blkif.X86_64, 2, 256, 0}, {blkif.X86_64, 4, 0, 3}, {blkif.X86_64, 0, 0, 2}} {
		t.Run(fmt.Sprintf("%v/order%d/indirect%d/workers%d", c.proto, c.order, c.indirect, c.workers), func(t *testing.T) {
			const workers, region = 8, 512 << 10
			r := newRigOpts(t, Options{Protocol: c.proto, RingOrder: c.order, MaxIndirectSegments: c.indirect}, workers*region,
				ring.Options{MaxIndirectSegments: c.indirect, Workers: c.workers})
			parallel.Run(t, workers, func(w int) error {
				return exercise(r.f, int64(w)*region, region, uint64(w))
			})
			if err := r.f.Flush(); err != nil {
				t.Fatalf("Flush: %v", err)
			}
			if r.img.flushes.Load() == 0 || r.stats.Flushes.Load() != 1 {
				t.Errorf("flush did not reach the image: %d image flushes, %d ring flushes", r.img.flushes.Load(), r.stats.Flushes.Load())
			}
			if r.stats.Errors.Load() != 0 {
				t.Errorf("%d error responses", r.stats.Errors.Load())
			}
			if c.indirect > 0 && r.stats.Indirects.Load() == 0 {
				t.Error("no indirect requests were used")
			}
			if c.indirect == 0 && r.stats.Indirects.Load() != 0 {
				t.Error("indirect requests without the feature")
			}
			t.Logf("indirect %d reads %d writes %d batches %d notifies %d wakeups %d", r.stats.Indirects.Load(), r.stats.Reads.Load(), r.stats.Writes.Load(),
				r.stats.Batches.Load(), r.stats.Notifies.Load(), r.stats.Wakeups.Load())
		})
	}
}

// exercise writes and reads random ranges of [base, base+n) and checks
// them against a model, then checks the image file itself through a
// whole-region read.
func exercise(f *Frontend, base, n int64, seed uint64) error {
	rnd := rand.New(rand.NewPCG(seed, 42))
	model := make([]byte, n)
	for i := range 60 {
		aligned := rnd.IntN(3) != 0
		var off, l int64
		if aligned {
			off = rnd.Int64N(n/512) * 512
			l = (1 + rnd.Int64N(min(200, (n-off)/512))) * 512
		} else {
			off = rnd.Int64N(n - 1)
			l = 1 + rnd.Int64N(min(70000, n-off))
		}
		if rnd.IntN(2) == 0 {
			buf := make([]byte, l)
			for j := range buf {
				buf[j] = byte(rnd.Uint32())
			}
			if k, err := f.WriteAt(buf, base+off); err != nil || int64(k) != l {
				return fmt.Errorf("op %d: WriteAt(%d, %d) = %d, %v", i, base+off, l, k, err)
			}
			copy(model[off:], buf)
		} else {
			buf := make([]byte, l)
			if k, err := f.ReadAt(buf, base+off); err != nil || int64(k) != l {
				return fmt.Errorf("op %d: ReadAt(%d, %d) = %d, %v", i, base+off, l, k, err)
			}
			if !bytes.Equal(buf, model[off:off+l]) {
				return fmt.Errorf("op %d: ReadAt(%d, %d) differs from what was written", i, base+off, l)
			}
		}
	}
	got := make([]byte, n)
	if _, err := f.ReadAt(got, base); err != nil {
		return err
	}
	if !bytes.Equal(got, model) {
		return fmt.Errorf("region %d: final read differs", base)
	}
	return nil
}

// TestImageHoldsWrites checks the file itself, not only the frontend's
// view of it.
func TestImageHoldsWrites(t *testing.T) {
	r := newRig(t, blkif.X86_64, 0, 4<<20, ring.Options{})
	want := make([]byte, 4<<20)
	rnd := rand.New(rand.NewPCG(1, 2))
	for j := range want {
		want[j] = byte(rnd.Uint32())
	}
	if _, err := r.f.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	// A few unaligned overwrites.
	for _, o := range []struct{ off, n int64 }{{1, 10}, {511, 2}, {1000, 5000}, {4<<20 - 3, 3}} {
		p := bytes.Repeat([]byte{0xa5}, int(o.n))
		if _, err := r.f.WriteAt(p, o.off); err != nil {
			t.Fatal(err)
		}
		copy(want[o.off:], p)
	}
	got, err := os.ReadFile(r.img.f.Name())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("image file differs from what was written through the ring")
	}
	// Past the end.
	if _, err := r.f.WriteAt([]byte{1}, 4<<20); !errors.Is(err, image.ErrOutOfRange) {
		t.Errorf("write past end: %v", err)
	}
	buf := make([]byte, 10)
	if n, err := r.f.ReadAt(buf, 4<<20-4); n != 4 || err != io.EOF {
		t.Errorf("read across the end: %d, %v", n, err)
	}
}

func TestReadOnlyAndErrors(t *testing.T) {
	r := newRig(t, blkif.X86_32, 0, 1<<20, ring.Options{ReadOnly: true})
	if _, err := r.f.WriteAt(make([]byte, 512), 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("write on read-only: %v", err)
	}
	if err := r.f.Flush(); err != nil {
		t.Errorf("flush on read-only: %v", err)
	}
	// The backend's I/O error becomes EIO.
	r.img.failAt.Store(8192)
	if _, err := r.f.ReadAt(make([]byte, 512), 8192); !errors.Is(err, syscall.EIO) || !errors.Is(err, ErrIO) {
		t.Errorf("failing read: %v", err)
	}
	r.img.failAt.Store(0)
	if _, err := r.f.ReadAt(make([]byte, 512), 8192); err != nil {
		t.Errorf("read after the fault cleared: %v", err)
	}
}

// TestCloseFailsCalls: with no backend answering, calls in flight and
// after Close fail with ErrClosed, and the cause is kept.
func TestCloseFailsCalls(t *testing.T) {
	f, err := New(Options{Protocol: blkif.X86_64})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(make([]byte, 512), 0); !errors.Is(err, ErrNotConnected) {
		t.Errorf("before Connect: %v", err)
	}
	if err := f.Connect(2048, 512, false); err != nil {
		t.Fatal(err)
	}
	const n = 40 // more than the 32 tags: some wait for a tag, some for a response
	errs := make(chan error, n)
	for i := range n {
		go func() {
			_, err := f.ReadAt(make([]byte, 4096), int64(i)*4096%(1<<20))
			errs <- err
		}()
	}
	cause := errors.New("worker died")
	if err := f.CloseWithError(cause); err != nil {
		t.Fatal(err)
	}
	for range n {
		if err := <-errs; !errors.Is(err, ErrClosed) || !errors.Is(err, cause) {
			t.Errorf("in-flight call: %v", err)
		}
	}
	if err := f.Flush(); !errors.Is(err, ErrClosed) {
		t.Errorf("after close: %v", err)
	}
}

// TestDiscard: aligned and unaligned discards read back as zeros and punch
// the file; without the feature Discard says unsupported.
func TestDiscard(t *testing.T) {
	r := newRig(t, blkif.X86_64, 0, 1<<20, ring.Options{Discard: true})
	if _, err := r.f.WriteAt(bytes.Repeat([]byte{0xff}, 1<<20), 0); err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte{0xff}, 1<<20)
	for _, d := range []struct{ off, n int64 }{{4096, 65536}, {100, 1000}, {200000, 3}, {1<<20 - 700, 700}} {
		if err := r.f.Discard(d.off, d.n); err != nil {
			t.Fatalf("Discard(%d, %d): %v", d.off, d.n, err)
		}
		clear(want[d.off : d.off+d.n])
	}
	got := make([]byte, 1<<20)
	if _, err := r.f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("discarded ranges do not read as zeros")
	}
	if r.stats.Discards.Load() != 3 {
		t.Errorf("%d discard requests, want 3 (the 3-byte one is a write)", r.stats.Discards.Load())
	}
	var st unix.Stat_t
	unix.Fstat(int(r.img.f.Fd()), &st)
	if st.Blocks*512 >= 1<<20 {
		t.Errorf("file still has %d bytes allocated: nothing punched", st.Blocks*512)
	}
	if err := r.f.Discard(1<<20, 1); !errors.Is(err, image.ErrOutOfRange) {
		t.Errorf("discard past the end: %v", err)
	}
	// Without the feature, Discard writes zeros.
	r2 := newRig(t, blkif.X86_64, 0, 1<<20, ring.Options{})
	if _, err := r2.f.WriteAt(bytes.Repeat([]byte{0xff}, 8192), 0); err != nil {
		t.Fatal(err)
	}
	if err := r2.f.Discard(100, 5000); err != nil {
		t.Fatalf("discard without the feature: %v", err)
	}
	want = bytes.Repeat([]byte{0xff}, 8192)
	clear(want[100:5100])
	got = got[:8192]
	if _, err := r2.f.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) || r2.stats.Discards.Load() != 0 {
		t.Errorf("discard without the feature: %v, %d discard requests", err, r2.stats.Discards.Load())
	}
}
