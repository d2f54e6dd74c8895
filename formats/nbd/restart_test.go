package nbd

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
	"github.com/blktap-go/blktap/formats/internal/imagetest"
)

// watchdog fails the test if fn does not return: the property under test
// is "never hangs", and this bound is far above every deadline involved.
func watchdog(t *testing.T, limit time.Duration, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { defer close(done); fn() }()
	select {
	case <-done:
	case <-time.After(limit):
		t.Fatalf("hung: not done after %v", limit)
	}
}

func rawFile(t *testing.T, size int64) string {
	f := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(f, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(f, size); err != nil {
		t.Fatal(err)
	}
	return f
}

// TestKillRestartMidRun: workers write and verify their own slots while
// qemu-nbd is killed and, once requests have failed, restarted on the
// same socket. Every failure must be an EIO-class error; after the
// restart every worker must succeed again; the data must be what the
// last successful write of each slot left (a slot whose last write
// failed is undefined and not checked).
func TestKillRestartMidRun(t *testing.T) {
	file := rawFile(t, restartSize)
	srv := qemuNBD(t, file)
	r := newRestartRun(mustOpen(t, srv.uri(""), Options{Timeout: time.Second}))
	var wg sync.WaitGroup
	for w := range restartWorkers {
		wg.Go(func() { r.worker(t, w) })
	}
	watchdog(t, 60*time.Second, func() {
		r.waitFor(t, r.allDid(0, 3))
		srv.kill()
		r.phase.Store(1)
		// With the server gone, requests fail after their deadline.
		for {
			r.mu.Lock()
			f := r.failures
			r.mu.Unlock()
			if f >= restartWorkers || t.Failed() {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		r.phase.Store(2)
		srv.start()
		r.waitFor(t, r.allDid(2, 3))
		close(r.stop)
		wg.Wait()
	})
	if t.Failed() {
		return
	}
	t.Logf("failures while the server was down: %d", r.failures)
	r.verify(t, file)
}

const restartSize, restartWorkers, restartSlots, restartSlotSize = 8 << 20, 4, 8, 64 << 10

// restartRun is the shared state of TestKillRestartMidRun's workers.
type restartRun struct {
	img      *Image
	phase    atomic.Int32 // 0 before kill, 1 killed, 2 restarted
	mu       sync.Mutex
	okBy     map[[2]int]int // [phase, worker] -> successes
	failures int
	known    [][]int // [worker][slot] -> seed of its content, -1 unknown
	stop     chan struct{}
	progress chan struct{}
}

func newRestartRun(img *Image) *restartRun {
	r := &restartRun{img: img, okBy: map[[2]int]int{}, known: make([][]int, restartWorkers),
		stop: make(chan struct{}), progress: make(chan struct{}, 1000)}
	for w := range r.known {
		r.known[w] = make([]int, restartSlots)
		for s := range r.known[w] {
			r.known[w][s] = -2 // never written: zeros
		}
	}
	return r
}

// worker writes and reads back its own slots in turn until stop.
func (r *restartRun) worker(t *testing.T, w int) {
	for i := 0; ; i++ {
		select {
		case <-r.stop:
			return
		default:
		}
		slot := i % restartSlots
		off := int64(w*restartSlots+slot) * restartSlotSize
		seed := w*100000 + i
		p := imagetest.Pattern(uint64(seed), restartSlotSize)
		ph := int(r.phase.Load())
		_, err := r.img.WriteAt(p, off)
		r.mu.Lock()
		if err != nil {
			r.known[w][slot] = -1
			r.failures++
			if !isEIO(err) {
				t.Errorf("worker %d write: %v (want an EIO-class error)", w, err)
			}
			r.mu.Unlock()
			continue
		}
		r.known[w][slot] = seed
		r.mu.Unlock()
		got := make([]byte, restartSlotSize)
		if _, err := r.img.ReadAt(got, off); err != nil {
			if !isEIO(err) {
				t.Errorf("worker %d read: %v", w, err)
			}
			r.mu.Lock()
			r.failures++
			r.mu.Unlock()
			continue
		}
		if !bytes.Equal(got, p) {
			t.Errorf("worker %d slot %d: read back differs", w, slot)
			return
		}
		r.mu.Lock()
		r.okBy[[2]int{ph, w}]++
		r.mu.Unlock()
		select {
		case r.progress <- struct{}{}:
		default:
		}
	}
}

func (r *restartRun) waitFor(t *testing.T, cond func() bool) {
	for {
		r.mu.Lock()
		ok := cond()
		r.mu.Unlock()
		if ok || t.Failed() {
			return
		}
		<-r.progress
	}
}

// allDid: every worker has had n successes in phase ph.
func (r *restartRun) allDid(ph, n int) func() bool {
	return func() bool {
		for w := range restartWorkers {
			if r.okBy[[2]int{ph, w}] < n {
				return false
			}
		}
		return true
	}
}

// verify checks every slot through the client and in the file.
func (r *restartRun) verify(t *testing.T, file string) {
	disk, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	for w := range restartWorkers {
		for s := range restartSlots {
			off := int64(w*restartSlots+s) * restartSlotSize
			var want []byte
			switch seed := r.known[w][s]; seed {
			case -1:
				continue
			case -2:
				want = make([]byte, restartSlotSize)
			default:
				want = imagetest.Pattern(uint64(seed), restartSlotSize)
			}
			got := make([]byte, restartSlotSize)
			if _, err := r.img.ReadAt(got, off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) || !bytes.Equal(disk[off:off+restartSlotSize], want) {
				t.Errorf("worker %d slot %d: not the last acknowledged write", w, s)
			}
		}
	}
}

// TestLostWritesReportedByFlush: a write acknowledged but not flushed
// when the server dies may be lost; the next Flush says so, once.
func TestLostWritesReportedByFlush(t *testing.T) {
	file := rawFile(t, 1<<20)
	srv := qemuNBD(t, file)
	img := mustOpen(t, srv.uri(""), Options{Timeout: 5 * time.Second})
	if _, err := img.WriteAt([]byte("unflushed"), 0); err != nil {
		t.Fatal(err)
	}
	srv.kill()
	srv.start()
	watchdog(t, 30*time.Second, func() {
		// The drop is seen at the latest when this write is sent; it
		// is re-sent on the new connection and succeeds.
		if _, err := img.WriteAt([]byte("after"), 4096); err != nil {
			t.Errorf("write after restart: %v", err)
		}
		if err := img.Flush(); !isEIO(err) {
			t.Errorf("first flush after the drop: %v, want EIO", err)
		}
		if err := img.Flush(); err != nil {
			t.Errorf("second flush: %v", err)
		}
	})
}

// TestServerGone: killed and never restarted, requests fail with
// ErrTimeout after the deadline, and Close returns.
func TestServerGone(t *testing.T) {
	srv := qemuNBD(t, rawFile(t, 1<<20))
	img, err := Open(srv.uri(""), Options{Timeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	srv.kill()
	watchdog(t, 30*time.Second, func() {
		var wg sync.WaitGroup
		for i := range 4 {
			wg.Go(func() {
				_, err := img.ReadAt(make([]byte, 4096), int64(i)*4096)
				if !errors.Is(err, ErrTimeout) || !isEIO(err) {
					t.Errorf("read with the server gone: %v", err)
				}
			})
		}
		wg.Wait()
		img.Close()
		if _, err := img.ReadAt(make([]byte, 1), 0); !errors.Is(err, image.ErrClosed) {
			t.Errorf("after close: %v", err)
		}
	})
}

// TestCloseWhileWaiting: Close ends requests stuck on a slow server with
// image.ErrClosed instead of leaving them to their deadline.
func TestCloseWhileWaiting(t *testing.T) {
	srv := nbdkit(t, "--filter=delay", "memory", "1M", "delay-read=20")
	img, err := Open(srv.uri(""), Options{Timeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	started := make(chan struct{}, 4)
	for i := range 4 {
		wg.Go(func() {
			started <- struct{}{}
			_, err := img.ReadAt(make([]byte, 4096), int64(i)*4096)
			if !errors.Is(err, image.ErrClosed) {
				t.Errorf("read ended by Close: %v", err)
			}
		})
	}
	for range 4 {
		<-started
	}
	watchdog(t, 15*time.Second, func() {
		// The reads may still be on their way into the queue; Close
		// fails them either way (queued: refused; in flight: aborted).
		if err := img.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
		wg.Wait()
	})
}
