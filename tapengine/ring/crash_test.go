package ring

import (
	"log/slog"
	"runtime"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/tapengine/blkif"
)

// crashImage ends the goroutine serving the ring (runtime.Goexit, which
// writes nothing more to the ring) when the read at offset at begins: a
// worker killed in the middle of a batch.
type crashImage struct {
	*memImage
	at int64
}

func (c *crashImage) ReadAt(p []byte, off int64) (int, error) {
	if off == c.at {
		runtime.Goexit()
	}
	return c.memImage.ReadAt(p, off)
}

// crashRelease is a PageReleaser whose first ReleasePages ends the serving
// goroutine: a worker killed after a batch's responses are decided and
// before they are published (the pooled path's window).
type crashRelease struct {
	*memTransport
	armed bool
}

func (c *crashRelease) ReleasePages() error {
	if c.armed {
		c.armed = false
		runtime.Goexit()
	}
	return nil
}

// drainUntilCrash runs one drain of a backend on tr over img on its own
// goroutine and returns once that goroutine has ended, by a crash or not.
func drainUntilCrash(t *testing.T, tr Transport, img *memImage, crashAt int64, opts Options) {
	t.Helper()
	var im image.Image = img
	if crashAt >= 0 {
		im = &crashImage{memImage: img, at: crashAt}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		s, err := newServer(tr, blkif.X86_64, im, opts)
		if err != nil {
			t.Error(err)
			return
		}
		defer s.close()
		if err := s.drain(); err != nil {
			t.Error(err)
		}
	}()
	<-done
}

// TestCrashBeforePublish: a backend killed between deciding responses and
// publishing them leaves the ring to a restarted one (NewBack resumes at
// rsp_prod). The new backend must find only the frontend's requests in
// the unpublished slots, so every request gets exactly one response,
// with its own id, and nothing is answered that was not asked
// (docs/WIRE.md, section "Grant mapping and event channels": a restarted worker resumes at the published response index).
func TestCrashBeforePublish(t *testing.T) {
	const n = publishEvery + 4
	for _, c := range []struct {
		name    string
		workers int
		crashAt int64 // the read that kills the first backend; -1: its release point
	}{
		// Requests 0..7 are published mid-batch, 8 and 9 answered but
		// not yet published when the read of request 10 kills it.
		{"sequential", 0, 10 * 4096},
		// The pool answers all n, then dies releasing their pages.
		{"pooled", 4, -1},
	} {
		t.Run(c.name, func(t *testing.T) {
			mt := newMemTransport(t, 0)
			front, err := NewFront(mt.ring, blkif.X86_64)
			if err != nil {
				t.Fatal(err)
			}
			front.Init()
			for i := range n {
				mt.grant(uint32(100+i), false)
				r := rw(blkif.OpRead, uint64(1000+i), uint64(i)*8, seg(uint32(100+i), 0, 7))
				if err := front.Push(&r); err != nil {
					t.Fatal(err)
				}
			}
			front.PushRequests()

			img := &memImage{data: make([]byte, 1<<20)}
			quiet := slog.New(slog.DiscardHandler)
			var tr Transport = mt
			if c.crashAt < 0 {
				tr = &crashRelease{memTransport: mt, armed: true}
			}
			drainUntilCrash(t, tr, img, c.crashAt, Options{Workers: c.workers, Logger: quiet})
			published, err := front.Pending()
			if err != nil {
				t.Fatal(err)
			}
			if published == n {
				t.Fatal("the first backend published everything: no crash was simulated")
			}

			// The restarted worker, on the same shared pages.
			stats := new(Stats)
			drainUntilCrash(t, mt, img, -1, Options{Workers: c.workers, Logger: quiet, Stats: stats})
			if got := stats.Reads.Load(); got != uint64(n-published) {
				t.Errorf("restarted backend saw %d reads, want the %d unpublished requests", got, n-published)
			}
			if bad := stats.Invalid.Load() + stats.Unsupported.Load() + stats.Errors.Load(); bad != 0 {
				t.Errorf("restarted backend decoded %d garbage requests", bad)
			}

			seen := map[uint64]int{}
			k, err := front.Pending()
			if err != nil {
				t.Fatal(err)
			}
			if k != n {
				t.Fatalf("%d responses published in all, want %d", k, n)
			}
			for range k {
				var rsp blkif.Response
				front.Next(&rsp)
				if rsp.Op != blkif.OpRead || rsp.Status != blkif.StatusOK || rsp.ID < 1000 || rsp.ID >= 1000+n {
					t.Errorf("response %+v", rsp)
				}
				seen[rsp.ID]++
			}
			for i := range uint64(n) {
				if seen[1000+i] != 1 {
					t.Errorf("request id %d answered %d times", 1000+i, seen[1000+i])
				}
			}
		})
	}
}
