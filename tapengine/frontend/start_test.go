package frontend

import (
	"bytes"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/ring"
)

// recorder is a Completer that keeps what it was told.
type recorder struct {
	mu      sync.Mutex
	data    map[uint64][]byte
	errs    map[uint64]error
	batches int
	done    chan uint64
}

func newRecorder(n int) *recorder {
	return &recorder{data: map[uint64][]byte{}, errs: map[uint64]error{}, done: make(chan uint64, n)}
}

func (r *recorder) Complete(cookie uint64, data []byte, err error) {
	r.mu.Lock()
	if data != nil {
		r.data[cookie] = bytes.Clone(data)
	}
	r.errs[cookie] = err
	r.mu.Unlock()
	r.done <- cookie
}

func (r *recorder) CompleteBatch() {
	r.mu.Lock()
	r.batches++
	r.mu.Unlock()
}

// TestStartCalls: more started writes than there are tags (so a Start
// must publish what it held and wait), then started reads of the same
// blocks; every cookie completes once, with the bytes written, and a
// misaligned or oversized start is refused without a completion.
func TestStartCalls(t *testing.T) {
	const size = 4 << 20
	r := newRigOpts(t, Options{Protocol: blkif.X86_64, MaxIndirectSegments: 32}, size, ring.Options{MaxIndirectSegments: 32})
	f := r.f
	if f.StartMax() != 32*4096 {
		t.Fatalf("StartMax %d, want %d", f.StartMax(), 32*4096)
	}
	const n = 100 // 32 tags
	rec := newRecorder(2 * n)
	block := func(i int) []byte { return bytes.Repeat([]byte{byte(i)}, 8192) }
	for i := range n {
		if err := f.StartWrite(block(i), int64(i)*8192, rec, uint64(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Publish(); err != nil {
		t.Fatal(err)
	}
	for range n {
		<-rec.done
	}
	for i := range n {
		if err := f.StartRead(int64(i)*8192, 8192, rec, uint64(n+i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Publish(); err != nil {
		t.Fatal(err)
	}
	for range n {
		<-rec.done
	}
	rec.mu.Lock()
	for i := range 2 * n {
		if err := rec.errs[uint64(i)]; err != nil {
			t.Errorf("cookie %d: %v", i, err)
		}
	}
	for i := range n {
		if !bytes.Equal(rec.data[uint64(n+i)], block(i)) {
			t.Errorf("read %d: wrong bytes", i)
		}
		if rec.data[uint64(i)] != nil {
			t.Errorf("write %d completed with data", i)
		}
	}
	if rec.batches == 0 || rec.batches > 2*n {
		t.Errorf("%d batches for %d completions", rec.batches, 2*n)
	}
	rec.mu.Unlock()
	got := make([]byte, 8192)
	if _, err := r.img.f.ReadAt(got, 7*8192); err != nil || !bytes.Equal(got, block(7)) {
		t.Errorf("image at block 7: %v", err)
	}
	for _, c := range []struct {
		off int64
		n   int
	}{{100, 512}, {0, 100}, {0, 0}, {0, f.StartMax() + 512}, {size - 512, 1024}, {-512, 512}} {
		if err := f.StartRead(c.off, c.n, rec, 999); err == nil {
			t.Errorf("StartRead(%d, %d) accepted", c.off, c.n)
		}
	}
	select {
	case c := <-rec.done:
		t.Errorf("a refused start completed (cookie %d)", c)
	default:
	}
}

// TestStartThenClose: started requests the backend never answers are
// completed with the close error when the frontend closes, and Close
// waits for the reaper.
func TestStartThenClose(t *testing.T) {
	f, err := New(Options{Protocol: blkif.X86_64})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Connect(2048, 512, false); err != nil {
		t.Fatal(err)
	}
	const n = 20
	rec := newRecorder(n)
	for i := range n {
		if err := f.StartRead(int64(i)*4096, 4096, rec, uint64(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Publish(); err != nil {
		t.Fatal(err)
	}
	cause := errors.New("worker died")
	if err := f.CloseWithError(cause); err != nil {
		t.Fatal(err)
	}
	for range n {
		<-rec.done
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	for i := range n {
		if err := rec.errs[uint64(i)]; !errors.Is(err, ErrClosed) || !errors.Is(err, cause) {
			t.Errorf("cookie %d: %v", i, err)
		}
	}
	if err := f.StartWrite(make([]byte, 512), 0, rec, 1); !errors.Is(err, ErrClosed) {
		t.Errorf("start after close: %v", err)
	}
}

// TestLending: a write filled into a lent tag lands, a read completes in
// the lent pages, the reaper never frees a lent tag (all 32 lent, a 33rd
// TakeTag waits until one comes back), and Close with tags lent out leaves
// their memory mapped until the last PutTag.
func TestLending(t *testing.T) {
	const size = 4 << 20
	r := newRigOpts(t, Options{Protocol: blkif.X86_64}, size, ring.Options{})
	f := r.f
	rec := newRecorder(64)
	h, buf, err := f.TakeTag()
	if err != nil {
		t.Fatal(err)
	}
	if len(buf) != f.StartMax() {
		t.Fatalf("lent %d bytes, StartMax %d", len(buf), f.StartMax())
	}
	copy(buf, bytes.Repeat([]byte{0x6b}, 8192))
	if err := f.StartTagWrite(h, 64<<10, 8192, rec, 1); err != nil {
		t.Fatal(err)
	}
	f.Publish()
	<-rec.done
	f.PutTag(h)
	got := make([]byte, 8192)
	if _, err := r.img.f.ReadAt(got, 64<<10); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{0x6b}, 8192)) {
		t.Fatalf("lent write did not land: %v", err)
	}

	var hs []uint64
	var bufs [][]byte
	for range 32 {
		h, b, err := f.TakeTag()
		if err != nil {
			t.Fatal(err)
		}
		hs, bufs = append(hs, h), append(bufs, b)
	}
	for i, h := range hs {
		if err := f.StartTagRead(h, 64<<10, 4096, rec, uint64(100+i)); err != nil {
			t.Fatal(err)
		}
	}
	f.Publish()
	for range hs {
		<-rec.done
	}
	rec.mu.Lock()
	for i := range hs {
		if rec.errs[uint64(100+i)] != nil || !bytes.Equal(bufs[i][:4096], got[:4096]) {
			t.Errorf("lent read %d: %v", i, rec.errs[uint64(100+i)])
		}
	}
	rec.mu.Unlock()
	extra := make(chan uint64, 1)
	go func() {
		h, _, err := f.TakeTag()
		if err != nil {
			t.Error(err)
		}
		extra <- h
	}()
	select {
	case <-extra:
		t.Fatal("a 33rd tag was lent while 32 were out")
	case <-time.After(50 * time.Millisecond):
	}
	f.PutTag(hs[0])
	hs[0] = <-extra

	// Close with every tag lent: the pages stay readable until the last
	// PutTag, which unmaps them.
	r.shutdown(t)
	for i, h := range hs {
		_ = bufs[i][0] // a fault here would be the memory unmapped early
		f.PutTag(h)
	}
	if _, _, err := f.TakeTag(); !errors.Is(err, ErrClosed) {
		t.Errorf("TakeTag after Close: %v", err)
	}
}

// TestPoll: a caller polling beside the reaper completes responses on its
// own goroutine (at least sometimes: the reaper races it), and between
// them every started request completes exactly once, with its data.
func TestPoll(t *testing.T) {
	r := newRig(t, blkif.X86_64, 0, 4<<20, ring.Options{})
	f := r.f
	if f.Poll(time.Millisecond) {
		t.Fatal("Poll found responses with nothing in flight")
	}
	want := bytes.Repeat([]byte{0x3d}, 4096)
	if _, err := r.img.f.WriteAt(want, 8192); err != nil {
		t.Fatal(err)
	}
	const n = 50
	rec := newRecorder(n)
	polled := 0
	for i := range n {
		if err := f.StartRead(8192, 4096, rec, uint64(i)); err != nil {
			t.Fatal(err)
		}
		f.Publish()
		if f.Poll(time.Second) {
			polled++
		}
		<-rec.done
	}
	select {
	case c := <-rec.done:
		t.Fatalf("cookie %d completed twice", c)
	case <-time.After(20 * time.Millisecond):
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	for i := range n {
		if rec.errs[uint64(i)] != nil || !bytes.Equal(rec.data[uint64(i)], want) {
			t.Errorf("cookie %d: %v", i, rec.errs[uint64(i)])
		}
	}
	if polled == 0 {
		t.Error("the reaper collected every response; Poll never did")
	}
	t.Logf("Poll collected %d of %d", polled, n)
}

// TestPollQuiet: for requests Poll publishes, the backend sends no
// notification (the reaper would wake for nothing), and a Poll that gives up before
// the answer leaves the ring asking again, so the reaper still completes
// it (without that, the read below would never complete).
func TestPollQuiet(t *testing.T) {
	r := newRig(t, blkif.X86_64, 0, 4<<20, ring.Options{})
	f := r.f
	const n = 50
	rec := newRecorder(n)
	before := r.stats.Notifies.Load()
	for i := range n {
		if err := f.StartRead(8192, 4096, rec, uint64(i)); err != nil {
			t.Fatal(err)
		}
		f.Poll(time.Second) // publishes it
		<-rec.done
	}
	// Before Poll asked for quiet, every response was notified: the
	// reaper's or Poll's final check had just asked for the next one.
	got := r.stats.Notifies.Load() - before
	if got > n/2 {
		t.Errorf("%d notifications for %d polled requests", got, n)
	}
	t.Logf("%d notifications for %d polled requests", got, n)
	r.img.delay.Store(int64(20 * time.Millisecond))
	for i := range 3 {
		if err := f.StartRead(8192, 4096, rec, uint64(n+i)); err != nil {
			t.Fatal(err)
		}
		if f.Poll(time.Microsecond) {
			t.Fatal("Poll found an answer the image had not given yet")
		}
		select {
		case <-rec.done:
		case <-time.After(10 * time.Second):
			t.Fatal("the reaper was never told of the answer Poll gave up on")
		}
	}
	if err := rec.errs[uint64(n)]; err != nil {
		t.Error(err)
	}
}
