package frontend

import (
	"encoding/binary"
	"errors"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/local"
	"github.com/blktap-go/blktap/tapengine/ring"
)

// TestHostileBackend: a backend that answers a request never made, or
// publishes responses past the requests, fails the frontend with
// ErrHostile; the calls in flight fail, nothing panics or hangs.
func TestHostileBackend(t *testing.T) {
	for name, misbehave := range map[string]func(tr ring.Transport, back *ring.Back, req *blkif.Request){
		"unknown id": func(tr ring.Transport, back *ring.Back, req *blkif.Request) {
			back.Respond(&blkif.Response{ID: 9999, Op: req.Op})
			back.PushResponses()
		},
		"id answered twice": func(tr ring.Transport, back *ring.Back, req *blkif.Request) {
			back.Respond(&blkif.Response{ID: req.ID, Op: req.Op})
			back.Respond(&blkif.Response{ID: req.ID, Op: req.Op})
			back.PushResponses()
		},
		"rsp_prod far ahead": func(tr ring.Transport, back *ring.Back, req *blkif.Request) {
			binary.LittleEndian.PutUint32(tr.Ring()[blkif.OffRspProd:], 1000)
		},
	} {
		t.Run(name, func(t *testing.T) {
			f, err := New(Options{Protocol: blkif.X86_64})
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			memfd, _, _ := f.BackendFDs()
			tr, back := hostileBack(t, f)
			gdone := misbehaveOnce(tr, back, misbehave)
			if err := f.Connect(2048, 512, false); err != nil {
				t.Fatal(err)
			}
			if f.Err() != nil {
				t.Fatalf("Err before anything broke: %v", f.Err())
			}
			_, err = f.ReadAt(make([]byte, 4096), 0)
			if !errors.Is(err, ring.ErrHostile) || !errors.Is(err, ErrClosed) {
				t.Fatalf("ReadAt: %v, want ErrHostile", err)
			}
			t.Log(err)
			<-gdone
			if _, err := f.WriteAt(make([]byte, 512), 0); !errors.Is(err, ring.ErrHostile) {
				t.Errorf("later call: %v", err)
			}
			// Its owner, which made no call, learns of it too.
			select {
			case <-f.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("Done not closed after the frontend gave up")
			}
			if err := f.Err(); !errors.Is(err, ring.ErrHostile) {
				t.Errorf("Err: %v, want ErrHostile", err)
			}
			// Giving up stops the calls; Close still releases the rest.
			if err := f.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
			if _, err := unix.FcntlInt(uintptr(memfd), unix.F_GETFD, 0); !errors.Is(err, unix.EBADF) {
				t.Errorf("grant memory fd %d still open after Close (%v)", memfd, err)
			}
		})
	}
}

// hostileBack attaches a backend's view of f's ring, on duplicates of
// f's file descriptors.
func hostileBack(t *testing.T, f *Frontend) (ring.Transport, *ring.Back) {
	memfd, kick, notify := f.BackendFDs()
	fds := make([]int, 3)
	var err error
	for i, fd := range []int{memfd, kick, notify} {
		if fds[i], err = unix.Dup(fd); err != nil {
			t.Fatal(err)
		}
	}
	tr, err := local.Attach(fds[0], f.RingRefs(), fds[1], fds[2])
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	back, err := ring.NewBack(tr.Ring(), blkif.X86_64)
	if err != nil {
		t.Fatal(err)
	}
	return tr, back
}

// misbehaveOnce waits for the first request, then misbehaves once; the
// channel closes when it has.
func misbehaveOnce(tr ring.Transport, back *ring.Back, misbehave func(ring.Transport, *ring.Back, *blkif.Request)) <-chan struct{} {
	gdone := make(chan struct{})
	go func() {
		defer close(gdone)
		pfd := []unix.PollFd{{Fd: int32(tr.WaitFD()), Events: unix.POLLIN}}
		for {
			n, err := back.Pending()
			if err != nil || n > 0 {
				break
			}
			unix.Poll(pfd, -1)
			tr.Ack()
		}
		var req blkif.Request
		back.Next(&req)
		misbehave(tr, back, &req)
		tr.Notify()
	}()
	return gdone
}
