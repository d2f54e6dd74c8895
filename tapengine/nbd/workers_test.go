package nbd

import (
	"errors"
	"sync"
	"testing"
	"time"

	nbdclient "github.com/blktap-go/blktap/formats/nbd"
)

// barrierBackend answers a read only once `need` reads are inside ReadAt
// at the same time, or fails it after a while.
type barrierBackend struct {
	memBackend
	need int
	wait time.Duration // how long a read waits for the others
	mu   sync.Mutex
	in   int
	all  chan struct{}
}

func (b *barrierBackend) ReadAt(p []byte, off int64) (int, error) {
	b.mu.Lock()
	if b.in++; b.in == b.need {
		close(b.all)
	}
	b.mu.Unlock()
	select {
	case <-b.all:
		return b.memBackend.ReadAt(p, off)
	case <-time.After(b.wait):
		return 0, errors.New("fewer reads than wanted ran at once")
	}
}

// Export.Workers: a backend that waits on a network (rbd's aio) gets as
// many requests of one connection running at once as it asks for, beyond
// the default 16; without it the same reads cannot all run together.
//
// Each read is larger than inlineMax: a small read that arrives with
// nothing behind it in the socket runs on the reader goroutine (the
// queue-depth-1 path), and here it would hold the reader at the barrier,
// so that the others are never read, whatever Workers says.
func TestExportWorkers(t *testing.T) {
	const need = 40
	const size = inlineMax + 4096
	for _, c := range []struct {
		workers int
		ok      bool
	}{{need, true}, {0, false}} {
		// Where all must run at once, a read waits long: under -race on
		// a loaded machine the 40 reach the backend slowly, and only a
		// server that never runs them together fails. Where they cannot,
		// no wait is long enough, so a short one ends the case soon.
		wait := 2 * time.Second
		if c.ok {
			wait = 30 * time.Second
		}
		be := &barrierBackend{memBackend: memBackend{data: make([]byte, need*size)}, need: need, wait: wait, all: make(chan struct{})}
		_, _, uri := startServer(t, Export{Backend: be, RoundTrip: true, Workers: c.workers})
		img, err := nbdclient.Open(uri, nbdclient.Options{})
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errs := make(chan error, need)
		for i := range need {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := img.ReadAt(make([]byte, size), int64(i)*size); err != nil {
					errs <- err
				}
			}()
		}
		wg.Wait()
		img.Close()
		close(errs)
		if failed := len(errs) > 0; failed == c.ok {
			t.Errorf("Workers %d: %d of %d reads failed, want ok=%v", c.workers, len(errs), need, c.ok)
		}
	}
}
