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
	case <-time.After(3 * time.Second):
		return 0, errors.New("fewer reads than wanted ran at once")
	}
}

// Export.Workers: a backend that waits on a network (rbd's aio) gets as
// many requests of one connection running at once as it asks for, beyond
// the default 16; without it the same reads cannot all run together.
func TestExportWorkers(t *testing.T) {
	const need = 40
	for _, c := range []struct {
		workers int
		ok      bool
	}{{need, true}, {0, false}} {
		be := &barrierBackend{memBackend: memBackend{data: make([]byte, 1<<20)}, need: need, all: make(chan struct{})}
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
				if _, err := img.ReadAt(make([]byte, 4096), int64(i)*4096); err != nil {
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
