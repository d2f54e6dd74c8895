package worker

import (
	"bytes"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/internal/testutil"
)

// startingImage is an image.Starter over a byte slice: each started call
// is held until run (or, with autoRun, not at once), then completed to
// its Completer, in a batch of one, by the image's one completion
// goroutine, as rbd's are.
type startingImage struct {
	fakeImage
	mu      sync.Mutex
	data    []byte
	held    []func()
	autoRun bool
	done    chan func()
}

func newStartingImage(t *testing.T, size int) *startingImage {
	s := &startingImage{data: make([]byte, size), done: make(chan func(), 1024)}
	for i := range s.data {
		s.data[i] = byte(i / 4096)
	}
	go func() {
		for f := range s.done {
			f()
		}
	}()
	t.Cleanup(func() { close(s.done) })
	return s
}

func (s *startingImage) Size() int64  { return int64(len(s.data)) }
func (s *startingImage) Starts() bool { return true }

func (s *startingImage) StartRead(p []byte, off int64, c image.Completer, cookie uint64) error {
	return s.start(func() {
		s.mu.Lock()
		copy(p, s.data[off:])
		s.mu.Unlock()
		c.Complete(cookie, p, nil)
		c.CompleteBatch()
	})
}

func (s *startingImage) StartWrite(p []byte, off int64, c image.Completer, cookie uint64) error {
	if off+int64(len(p)) > int64(len(s.data)) {
		return image.ErrOutOfRange
	}
	return s.start(func() {
		s.mu.Lock()
		copy(s.data[off:], p)
		s.mu.Unlock()
		c.Complete(cookie, nil, nil)
		c.CompleteBatch()
	})
}

func (s *startingImage) start(done func()) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.autoRun {
		s.done <- done
	} else {
		s.held = append(s.held, done)
	}
	return nil
}

// run completes every held call.
func (s *startingImage) run() {
	s.mu.Lock()
	held := s.held
	s.held = nil
	s.mu.Unlock()
	for _, f := range held {
		s.done <- f
	}
}

// startedOver serves img through a startedIO, as the export would.
func startedOver(img image.Image) *startedIO {
	g := &gate{img: img}
	return newStartedIO(&throttle{Image: g}, g)
}

// TestStartedIOCompletes: started reads and writes complete once each,
// with their cookies, reads with the image's bytes; the Completer hears
// CompleteBatch after the last; the meter counts nothing in flight
// afterwards, and tags are reused rather than grown.
func TestStartedIOCompletes(t *testing.T) {
	img := newStartingImage(t, 1<<20)
	img.autoRun = true
	s := startedOver(img)
	c := testutil.NewCompletions(1024)
	for round := range 3 {
		for i := range 32 {
			p := bytes.Repeat([]byte{0xA0 + byte(round)}, 4096)
			if err := s.StartWrite(p, int64(i)*4096, c, uint64(round*1000+i)); err != nil {
				t.Fatal(err)
			}
		}
		c.Wait(t, 32)
		for i := range 32 {
			if err := s.StartRead(int64(i)*4096, 4096, c, uint64(round*1000+500+i)); err != nil {
				t.Fatal(err)
			}
		}
		c.Wait(t, 32)
	}
	for round := range 3 {
		for i := range 32 {
			if err := c.Errs[uint64(round*1000+i)]; err != nil || c.Data[uint64(round*1000+i)] != nil {
				t.Fatalf("write %d/%d: err %v, data %v", round, i, err, c.Data[uint64(round*1000+i)] != nil)
			}
			got := c.Data[uint64(round*1000+500+i)]
			if want := bytes.Repeat([]byte{0xA0 + byte(round)}, 4096); !bytes.Equal(got, want) {
				t.Fatalf("read %d/%d: not the bytes written", round, i)
			}
		}
	}
	// The answerer may answer several of the image's batches at once.
	if b := c.WaitBatched(t, 6*32); b == 0 || b > 6*32 {
		t.Fatalf("%d CompleteBatch calls for %d batches of one", b, 6*32)
	}
	if _, busy := s.meter.activity(); busy {
		t.Fatal("the meter counts calls in flight after every one completed")
	}
	if len(s.calls) > 64 {
		t.Fatalf("%d tags for at most 32 calls in flight at once", len(s.calls))
	}
}

// TestStartedIOPauseWaits: pause waits for a started call to complete,
// and a call started while paused waits for resume.
func TestStartedIOPauseWaits(t *testing.T) {
	img := newStartingImage(t, 1<<20)
	s := startedOver(img)
	c := testutil.NewCompletions(1024)
	if err := s.StartWrite(make([]byte, 4096), 0, c, 1); err != nil {
		t.Fatal(err)
	}
	paused := make(chan image.Image)
	go func() { paused <- s.gate.pause() }()
	select {
	case <-paused:
		t.Fatal("pause returned with a started write in flight")
	case <-time.After(heldFor):
	}
	img.run()
	c.Wait(t, 1)
	var held image.Image
	select {
	case held = <-paused:
	case <-time.After(10 * time.Second):
		t.Fatal("pause did not return after the write completed")
	}
	started := make(chan error)
	go func() { started <- s.StartRead(0, 4096, c, 2) }()
	select {
	case <-started:
		t.Fatal("a read started while paused")
	case <-time.After(heldFor):
	}
	s.gate.resume(held)
	if err := <-started; err != nil {
		t.Fatal(err)
	}
	img.run()
	c.Wait(t, 1)
}

// TestStartedIOFallback: behind the gate an image that cannot start
// calls (a resume may install one) is called synchronously, and the
// Completer still hears of each call once.
func TestStartedIOFallback(t *testing.T) {
	s := startedOver(&fakeImage{fill: 7})
	c := testutil.NewCompletions(1024)
	if err := s.StartRead(0, 4096, c, 1); err != nil {
		t.Fatal(err)
	}
	if err := s.StartWrite(make([]byte, 4096), 0, c, 2); err != nil {
		t.Fatal(err)
	}
	c.Wait(t, 2)
	if c.Data[1] == nil || c.Data[1][0] != 7 || c.Errs[1] != nil || c.Errs[2] != nil {
		t.Fatalf("read %v (%v), write %v", c.Data[1] != nil, c.Errs[1], c.Errs[2])
	}
}

// TestStartedIORefused: a start the image refuses returns its error,
// the Completer hears nothing, and the gate is not left held.
func TestStartedIORefused(t *testing.T) {
	img := newStartingImage(t, 1<<20)
	s := startedOver(img)
	c := testutil.NewCompletions(1024)
	err := s.StartWrite(make([]byte, 4096), 1<<20, c, 1)
	if !errors.Is(err, image.ErrOutOfRange) {
		t.Fatalf("write past the end: %v", err)
	}
	if !pausesFreely(s.gate) {
		t.Fatal("the refused start left the gate held")
	}
	if c.Pending() != 0 {
		t.Fatal("the Completer heard of a refused start")
	}
	if _, busy := s.meter.activity(); busy {
		t.Fatal("the meter counts the refused start in flight")
	}
}

// stuck is a Completer whose client stopped reading: Complete blocks.
type stuck struct{ release chan struct{} }

func (s stuck) Complete(uint64, []byte, error) { <-s.release }
func (s stuck) CompleteBatch()                 {}

// TestStartedIOStuckClient: a Completer that blocks (its client stopped
// reading its socket) does not hold up the image's completion goroutine,
// which rbd shares with the disk's other calls, nor the gate.
func TestStartedIOStuckClient(t *testing.T) {
	img := newStartingImage(t, 1<<20)
	s := startedOver(img)
	c := stuck{make(chan struct{})}
	defer close(c.release)
	for i := range 4 {
		if err := s.StartRead(int64(i)*4096, 4096, c, uint64(i)); err != nil {
			t.Fatal(err)
		}
	}
	img.run()
	marker := make(chan struct{})
	img.done <- func() { close(marker) }
	select {
	case <-marker:
	case <-time.After(10 * time.Second):
		t.Fatal("the image's completion goroutine is held by a client that does not read")
	}
	if !pausesFreely(s.gate) {
		t.Fatal("pause waits for the replies of a client that does not read")
	}
}

// pausesFreely reports whether g pauses and resumes within 10 s: no call
// holds it.
func pausesFreely(g *gate) bool {
	done := make(chan struct{})
	go func() { g.resume(g.pause()); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(10 * time.Second):
		return false
	}
}
