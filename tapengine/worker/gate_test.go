package worker

import (
	"errors"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats/image"
)

// fakeImage marks every read with its fill byte (in the first byte only,
// to cost nothing in benchmarks). When entered is set, each
// ReadAt announces itself there and then waits for release, so a test
// can hold calls inside the image.
type fakeImage struct {
	image.Empty
	fill    byte
	entered chan struct{}
	release chan struct{}
}

func (f *fakeImage) Size() int64 { return 1 << 20 }

func (f *fakeImage) ReadAt(p []byte, off int64) (int, error) {
	if f.entered != nil {
		f.entered <- struct{}{}
		<-f.release
	}
	if len(p) > 0 {
		p[0] = f.fill
	}
	return len(p), nil
}

func (f *fakeImage) WriteAt(p []byte, off int64) (int, error) { return len(p), nil }
func (f *fakeImage) Flush() error                             { return nil }

// heldFor is how long a test watches for something that must not happen;
// a held call that gets through does so in microseconds.
const heldFor = 100 * time.Millisecond

type readResult struct {
	fill byte
	err  error
}

func readOne(img image.Image) <-chan readResult {
	out := make(chan readResult, 1)
	go func() {
		p := make([]byte, 8)
		_, err := img.ReadAt(p, 0)
		out <- readResult{p[0], err}
	}()
	return out
}

func wait[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

// Promise 1: calls take the read side, so they run inside the image at
// the same time.
func TestGateCallsRunConcurrently(t *testing.T) {
	img := &fakeImage{fill: 1, entered: make(chan struct{}), release: make(chan struct{})}
	g := &gate{img: img}
	a, b := readOne(g), readOne(g)
	wait(t, img.entered, "the first call to enter the image")
	wait(t, img.entered, "the second call to enter while the first is still inside")
	close(img.release)
	wait(t, a, "first read")
	wait(t, b, "second read")
}

// Promise 2: pause waits for the calls in flight, and holds every later
// call; nothing is refused. Promise 3: resume lets the held calls through
// to the image it installs.
func TestGatePauseDrainsHoldsAndResumeSwaps(t *testing.T) {
	old := &fakeImage{fill: 1, entered: make(chan struct{}), release: make(chan struct{})}
	g := &gate{img: old}
	inFlight := readOne(g)
	wait(t, old.entered, "the in-flight call to enter the image")

	paused := make(chan image.Image, 1)
	go func() { paused <- g.pause() }()
	select {
	case <-paused:
		t.Fatal("pause returned while a call was still inside the image")
	case <-time.After(heldFor):
	}
	close(old.release)
	if r := wait(t, inFlight, "the in-flight read"); r.err != nil || r.fill != 1 {
		t.Fatalf("in-flight read: fill %d, err %v; want the old image's 1", r.fill, r.err)
	}
	if got := wait(t, paused, "pause"); got != old {
		t.Fatalf("pause returned %v, want the image it took over", got)
	}

	held := readOne(g)
	select {
	case r := <-held:
		t.Fatalf("a call got through a paused gate: %+v", r)
	case <-time.After(heldFor):
	}
	g.resume(&fakeImage{fill: 2})
	if r := wait(t, held, "the held read"); r.err != nil || r.fill != 2 {
		t.Fatalf("held read: fill %d, err %v; want the new image's 2", r.fill, r.err)
	}
}

// A paused worker told to stop resumes onto closedImage: the held calls
// end with ErrClosed instead of hanging, and the size stays the disk's.
func TestGateResumeOntoClosedImage(t *testing.T) {
	g := &gate{img: &fakeImage{}}
	g.pause()
	held := readOne(g)
	g.resume(closedImage{size: 4096})
	if r := wait(t, held, "the held read"); !errors.Is(r.err, image.ErrClosed) {
		t.Fatalf("held read after a stop: %v, want ErrClosed", r.err)
	}
	if _, err := g.WriteAt(make([]byte, 8), 0); !errors.Is(err, image.ErrClosed) {
		t.Fatalf("write after a stop: %v, want ErrClosed", err)
	}
	if err := g.Flush(); !errors.Is(err, image.ErrClosed) {
		t.Fatalf("flush after a stop: %v, want ErrClosed", err)
	}
	if g.Size() != 4096 {
		t.Fatalf("size after a stop: %d, want 4096", g.Size())
	}
}
