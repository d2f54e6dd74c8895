//go:build rbd

package rbd

import (
	"bytes"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/blktap-go/blktap/internal/cephdev"
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
