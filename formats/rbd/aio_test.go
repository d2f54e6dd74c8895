//go:build rbd

package rbd

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/internal/cephdev"
	"github.com/blktap-go/blktap/internal/testutil"
)

// TestAIOManyInFlight: 64 writers and then 64 readers at once on one
// image go through librbd's aio (not the synchronous fallback), each
// gets its own bytes back, and the rbd tool exports exactly what was
// written.
func TestAIOManyInFlight(t *testing.T) {
	c, name, spec := newImage(t, 8<<20)
	img, err := Open(spec, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if !img.(*Image).aio {
		t.Fatal("I/O is synchronous: go-ceph's image handle was not reachable (rawImage), or the completion pipe failed")
	}
	const n, block = 64, 96 << 10 // blocks straddle 4 MiB objects too
	want := make([]byte, 8<<20)
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	for i := range n {
		p := bytes.Repeat([]byte{byte(i + 1)}, block)
		copy(want[i*block:], p)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := img.WriteAt(p, int64(i*block)); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got := make([]byte, block)
			if _, err := img.ReadAt(got, int64(i*block)); err != nil {
				errs <- err
			} else if !bytes.Equal(got, want[i*block:(i+1)*block]) {
				errs <- os.ErrInvalid
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("concurrent I/O: %v", err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(exportImage(t, c, name), want) {
		t.Fatal("rbd export differs from what was written")
	}
}

// exportImage is the image as the rbd tool exports it.
func exportImage(t *testing.T, c *cephdev.Cluster, name string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "export")
	c.RBD(t, "export", "--no-progress", "rbd/"+name, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// openStarter opens spec and fails t unless the image starts calls.
func openStarter(t *testing.T, spec string) *Image {
	t.Helper()
	img, err := Open(spec, Options{})
	if err != nil {
		t.Fatal(err)
	}
	im := img.(*Image)
	if !im.Starts() {
		t.Fatal("StartRead and StartWrite are off: go-ceph's image handle was not reachable (rawImage), or the completion pipe failed")
	}
	return im
}

// TestStartManyInFlight: 64 started writes and then 64 started reads at
// once complete to their Completer with their own cookies, the reads
// with the bytes written, each batch ends with CompleteBatch, and the
// rbd tool exports what was written. Close waits for started calls.
func TestStartManyInFlight(t *testing.T) {
	c, name, spec := newImage(t, 8<<20)
	im := openStarter(t, spec)
	const n, block = 64, 96 << 10
	want := make([]byte, 8<<20)
	w := testutil.NewCompletions(n)
	for i := range n {
		p := bytes.Repeat([]byte{byte(i + 1)}, block)
		copy(want[i*block:], p)
		if err := im.StartWrite(p, int64(i*block), w, uint64(1000+i)); err != nil {
			t.Fatal(err)
		}
	}
	w.Wait(t, n)
	r := testutil.NewCompletions(n)
	for i := range n {
		if err := im.StartRead(make([]byte, block), int64(i*block), r, uint64(2000+i)); err != nil {
			t.Fatal(err)
		}
	}
	r.Wait(t, n)
	// A batch's CompleteBatch may come after its last Complete: wait for it.
	for _, c := range []*testutil.Completions{w, r} {
		if b := c.WaitBatched(t, n); b == 0 || b > n {
			t.Fatalf("%d CompleteBatch calls for %d completions", b, n)
		}
	}
	for i := range n {
		if d, ok := w.Data[uint64(1000+i)]; !ok || d != nil {
			t.Fatalf("write %d: completed %v, with data %v", i, ok, d != nil)
		}
		if !bytes.Equal(r.Data[uint64(2000+i)], want[i*block:(i+1)*block]) {
			t.Fatalf("read %d: not the bytes written", i)
		}
	}
	// Past the end and of no bytes: refused, nothing started.
	if err := im.StartRead(make([]byte, 4096), 8<<20, r, 1); err == nil {
		t.Fatal("a read past the end started")
	}
	if err := im.StartWrite(nil, 0, r, 1); err == nil {
		t.Fatal("a write of no bytes started")
	}
	// Close with calls in flight waits for them.
	last := testutil.NewCompletions(n)
	for i := range n {
		if err := im.StartWrite(want[i*block:(i+1)*block], int64(i*block), last, uint64(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if k := last.Pending(); k != n {
		t.Fatalf("Close returned with %d of %d started writes completed", k, n)
	}
	last.WaitBatched(t, n) // and with each batch's CompleteBatch done
	if !bytes.Equal(exportImage(t, c, name), want) {
		t.Fatal("rbd export differs from what was written")
	}
}

// restarter starts another read from each completion of the last, until
// the image refuses one.
type restarter struct {
	im      *Image
	buf     []byte
	reads   atomic.Int64
	refused chan error
}

func (r *restarter) Complete(cookie uint64, _ []byte, err error) {
	if err == nil {
		r.reads.Add(1)
		err = r.im.StartRead(r.buf, 0, r, cookie+1)
	}
	if err != nil {
		r.refused <- err
	}
}

func (r *restarter) CompleteBatch() {}

// TestStartFromCompletion: a Completer may start the next call from
// Complete, even while Close runs. Close neither deadlocks (Complete runs
// outside the image's lock) nor returns before the call in flight was
// answered, and the start it refuses says the image is closed.
func TestStartFromCompletion(t *testing.T) {
	_, _, spec := newImage(t, 1<<20)
	im := openStarter(t, spec)
	r := &restarter{im: im, buf: make([]byte, 4096), refused: make(chan error, 1)}
	if err := im.StartRead(r.buf, 0, r, 0); err != nil {
		t.Fatal(err)
	}
	for r.reads.Load() < 20 {
		select {
		case err := <-r.refused:
			t.Fatalf("refused before Close: %v", err)
		case <-time.After(time.Millisecond):
		}
	}
	closed := make(chan error, 1)
	go func() { closed <- im.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close hung with a Completer starting calls")
	}
	select {
	case err := <-r.refused:
		if !errors.Is(err, image.ErrClosed) {
			t.Fatalf("refused with %v, not ErrClosed", err)
		}
	default:
		t.Fatal("Close returned before the read in flight was answered")
	}
	t.Logf("%d chained reads before Close", r.reads.Load())
}
