package frontend

import (
	"bytes"
	"context"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/vmdk"
	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/local"
	"github.com/blktap-go/blktap/tapengine/ring"
)

func attachDup(t *testing.T, f *Frontend) ring.Transport {
	t.Helper()
	memfd, kick, notify := f.BackendFDs()
	fds := passFDs(t, memfd, kick, notify)
	tr, err := local.Attach(fds[0], f.RingRefs(), fds[1], fds[2])
	if err != nil {
		t.Fatal(err)
	}
	return tr
}

// swallow is a backend that takes n requests off the ring on tr and
// answers none (a worker killed, or stopped, mid-I/O). The channel closes
// once it has them.
func swallow(t *testing.T, tr ring.Transport, n int) <-chan struct{} {
	t.Helper()
	back, err := ring.NewBack(tr.Ring(), blkif.X86_64)
	if err != nil {
		t.Fatal(err)
	}
	consumed := make(chan struct{})
	go func() {
		defer close(consumed)
		pfd := []unix.PollFd{{Fd: int32(tr.WaitFD()), Events: unix.POLLIN}}
		var req blkif.Request
		for taken := 0; taken < n; {
			k, err := back.Pending()
			if err != nil {
				return
			}
			for ; k > 0 && taken < n; k-- {
				back.Next(&req)
				taken++
			}
			if taken < n {
				if more, err := back.FinalCheck(); err != nil || more {
					continue
				}
				unix.Poll(pfd, -1)
				tr.Ack()
			}
		}
	}()
	return consumed
}

// TestBackendRestart: a backend that dies after consuming requests but
// before answering them (a killed worker) loses nothing: a new backend
// attached to the same ring serves them again, and the callers, who only
// saw a pause, get their data. No frontend call is needed for that: a
// new Serve resumes at rsp_prod.
func TestBackendRestart(t *testing.T) {
	const size = 4 << 20
	f, err := New(Options{Protocol: blkif.X86_64})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img := newFileImage(t, size)
	pattern := bytes.Repeat([]byte("restart!"), size/8)
	if _, err := img.WriteAt(pattern, 0); err != nil {
		t.Fatal(err)
	}

	// The doomed backend: takes 8 requests off the ring, answers none.
	tr1 := attachDup(t, f)
	consumed := swallow(t, tr1, 8)
	if err := f.Connect(size/512, 512, false); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			off := int64(i) * 64 << 10
			if i%2 == 0 {
				buf := make([]byte, 64<<10)
				if _, err := f.ReadAt(buf, off); err != nil {
					errs <- err
				} else if !bytes.Equal(buf, pattern[off:off+64<<10]) {
					t.Errorf("read %d after restart: wrong data", i)
				}
				return
			}
			if _, err := f.WriteAt(bytes.Repeat([]byte{byte(i)}, 64<<10), off); err != nil {
				errs <- err
			}
		}()
	}
	<-consumed
	tr1.Close() // the worker is gone

	tr2 := attachDup(t, f)
	defer tr2.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ring.Serve(ctx, tr2, blkif.X86_64, img, ring.Options{}) }()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("call across the restart: %v", err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for i := 1; i < 16; i += 2 {
		got := make([]byte, 64<<10)
		img.ReadAt(got, int64(i)*64<<10)
		if !bytes.Equal(got, bytes.Repeat([]byte{byte(i)}, 64<<10)) {
			t.Errorf("write %d lost across the restart", i)
		}
	}
}

// parkedFlush is the image of a worker killed while it served a FLUSH:
// its Flush never returns and nothing after it happens.
type parkedFlush struct {
	image.Image
	entered chan struct{}
}

func (p *parkedFlush) Flush() error {
	close(p.entered)
	select {}
}

// syncedFlush records when the wrapped Flush has returned.
type syncedFlush struct {
	image.Image
	done atomic.Bool
}

func (s *syncedFlush) Flush() error {
	err := s.Image.Flush()
	s.done.Store(err == nil)
	return err
}

// TestFlushInFlightAcrossRestart is the restart rule for the FLUSH a
// worker had taken off the ring when it died: the new worker, on a fresh
// Image of the same file (the dead one's Image is dropped, never flushed
// or closed), answers it only after its own Flush (an fdatasync that
// covers what the dead process wrote) returned, and the acknowledged
// writes are there. VMDK once kept grain-table updates until Flush, so
// the new worker found nothing dirty and answered OK over lost data.
func TestFlushInFlightAcrossRestart(t *testing.T) {
	const size = 8 << 20
	path := filepath.Join(t.TempDir(), "d.vmdk")
	if err := vmdk.Create(path, vmdk.CreateOptions{Size: size}); err != nil {
		t.Fatal(err)
	}
	img1, err := vmdk.Open(path, vmdk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	f, err := New(Options{Protocol: blkif.X86_64})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	doomed := &parkedFlush{Image: img1, entered: make(chan struct{})}
	// Never closed: the parked backend must not touch a ring unmapped
	// under it. The dead worker's goroutine stays parked until the test
	// binary exits.
	tr1 := attachDup(t, f)
	go ring.Serve(context.Background(), tr1, blkif.X86_64, doomed, ring.Options{})
	if err := f.Connect(size/512, 512, false); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	for i := range 32 {
		off := int64(i) * 200 << 10
		b := bytes.Repeat([]byte{byte(i + 1)}, 12<<10)
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], b)
	}
	flushed := make(chan error, 1)
	go func() { flushed <- f.Flush() }()
	<-doomed.entered

	img2, err := vmdk.Open(path, vmdk.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer img2.Close()
	fresh := &syncedFlush{Image: img2}
	tr2 := attachDup(t, f)
	defer tr2.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ring.Serve(ctx, tr2, blkif.X86_64, fresh, ring.Options{}) }()
	if err := <-flushed; err != nil {
		t.Fatalf("the flush in flight across the restart: %v", err)
	}
	if !fresh.done.Load() {
		t.Fatal("the flush was answered before the new worker's Flush returned")
	}
	got := make([]byte, size)
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		i := 0
		for got[i] == want[i] {
			i++
		}
		t.Errorf("acknowledged and flushed writes lost across the restart (first at byte %d)", i)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
