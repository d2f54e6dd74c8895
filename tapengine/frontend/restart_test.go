package frontend

import (
	"bytes"
	"context"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

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
	back, err := ring.NewBack(tr1.Ring(), blkif.X86_64)
	if err != nil {
		t.Fatal(err)
	}
	consumed := make(chan struct{})
	go func() {
		defer close(consumed)
		pfd := []unix.PollFd{{Fd: int32(tr1.WaitFD()), Events: unix.POLLIN}}
		var req blkif.Request
		for taken := 0; taken < 8; {
			n, err := back.Pending()
			if err != nil {
				return
			}
			for ; n > 0 && taken < 8; n-- {
				back.Next(&req)
				taken++
			}
			if taken < 8 {
				if more, err := back.FinalCheck(); err != nil || more {
					continue
				}
				unix.Poll(pfd, -1)
				tr1.Ack()
			}
		}
	}()
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
