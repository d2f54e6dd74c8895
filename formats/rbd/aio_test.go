//go:build rbd

package rbd

import (
	"bytes"
	"os"
	"path/filepath"
	"sync"
	"testing"

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

// TestStartManyInFlight: 64 started writes and then 64 started reads at
// once complete to their Completer with their own cookies, the reads
// with the bytes written, each batch ends with CompleteBatch, and the
// rbd tool exports what was written. Close waits for started calls.
func TestStartManyInFlight(t *testing.T) {
	c, name, spec := newImage(t, 8<<20)
	img, err := Open(spec, Options{})
	if err != nil {
		t.Fatal(err)
	}
	im := img.(*Image)
	if !im.Starts() {
		t.Fatal("StartRead and StartWrite are off: go-ceph's image handle was not reachable (rawImage), or the completion pipe failed")
	}
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
	for _, c := range []*testutil.Completions{w, r} {
		if c.Batches == 0 || c.Batches > n {
			t.Fatalf("%d CompleteBatch calls for %d completions", c.Batches, n)
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
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if k := last.Pending(); k != n {
		t.Fatalf("Close returned with %d of %d started writes completed", k, n)
	}
	if !bytes.Equal(exportImage(t, c, name), want) {
		t.Fatal("rbd export differs from what was written")
	}
}
