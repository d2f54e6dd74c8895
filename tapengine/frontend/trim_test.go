package frontend

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/blktap-go/blktap/internal/parallel"
	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/ring"
)

// TestTrimGivesBackPages: writes through every tag touch their pages; Trim
// punches them out of the memfd (its allocated blocks fall to the table
// and ring pages), and what was written still reads back right, from the
// image through freshly faulted pages.
func TestTrimGivesBackPages(t *testing.T) {
	for _, indirect := range []int{0, 256} {
		r := newRigOpts(t, Options{Protocol: blkif.X86_64, MaxIndirectSegments: indirect}, 8<<20,
			ring.Options{MaxIndirectSegments: indirect})
		f := r.f
		rnd := rand.New(rand.NewPCG(uint64(indirect), 7))
		data := make([]byte, 8<<20)
		for i := range data {
			data[i] = byte(rnd.Uint32())
		}
		// One goroutine per 256 KiB stripe: many calls at once, so many
		// tags (up to all of them) are in flight and touched.
		var wg sync.WaitGroup
		const stripe = 256 << 10
		errs := make(chan error, len(data)/stripe)
		for off := 0; off < len(data); off += stripe {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := f.WriteAt(data[off:off+stripe], int64(off)); err != nil {
					errs <- err
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		before, err := f.gt.Allocated()
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Trim(); err != nil {
			t.Fatal(err)
		}
		after, err := f.gt.Allocated()
		if err != nil {
			t.Fatal(err)
		}
		// What may stay: the header and flags pages, and the ring.
		keep := int64(f.gt.Pages()-f.dataPages()) * pageSize
		t.Logf("indirect %d: %d tags x %d pages; memfd %d KiB before Trim, %d KiB after (at most %d KiB kept)",
			indirect, len(f.tags), f.segs, before>>10, after>>10, keep>>10)
		if after > keep {
			t.Fatalf("after Trim the memfd holds %d bytes, more than the %d of table and ring pages", after, keep)
		}
		if before-after < int64(f.segs)*pageSize {
			t.Fatalf("Trim gave back %d bytes; the writes touched at least one tag's %d pages", before-after, f.segs)
		}
		got := make([]byte, len(data))
		if _, err := f.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, data) {
			t.Fatal("the disk after Trim does not hold what was written")
		}
		r.shutdown(t)
	}
}

// TestTrimWhileBusy: Trim called over and over while many goroutines read
// and write (checking every byte) leaves every call correct: tags in
// flight are never punched.
func TestTrimWhileBusy(t *testing.T) {
	const workers, region = 6, 256 << 10
	r := newRigOpts(t, Options{Protocol: blkif.X86_64, RingOrder: 1, MaxIndirectSegments: 64}, workers*region,
		ring.Options{MaxIndirectSegments: 64})
	stop := make(chan struct{})
	trims := make(chan int, 1) // buffered: a failed run does not read it
	go func() {
		n := 0
		defer func() { trims <- n }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := r.f.Trim(); err != nil {
				t.Errorf("Trim: %v", err)
				return
			}
			n++
		}
	}()
	func() {
		// The trimmer stops even when a worker fails the test.
		defer close(stop)
		parallel.Run(t, workers, func(w int) error {
			return exercise(r.f, int64(w)*region, region, uint64(w)+100)
		})
	}()
	t.Logf("%d trims during the run", <-trims)
}

// TestTrimAfterClose: Trim on a closed frontend returns the close error
// and touches nothing (the memfd is gone).
func TestTrimAfterClose(t *testing.T) {
	r := newRig(t, blkif.X86_64, 0, 1<<20, ring.Options{})
	r.shutdown(t)
	if err := r.f.Trim(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Trim after Close: %v, want ErrClosed", err)
	}
}

// dataPages counts the pages Trim may punch: every tag's data and
// indirect pages.
func (f *Frontend) dataPages() int {
	return len(f.tags) * (f.segs + f.indirectPages())
}

// BenchmarkTrim: the cost of one idle trim of a fully touched grant
// table (32 tags x 128 pages + indirect pages, 16 MiB): the punch alone,
// with the touching (the page faults the next burst pays) outside the
// timer; BenchmarkRefault times those.
func BenchmarkTrim(b *testing.B) { benchTrim(b, false) }

// BenchmarkRefault: touching every data page of a trimmed grant table,
// i.e. the page faults that the first requests after an idle trim pay.
func BenchmarkRefault(b *testing.B) { benchTrim(b, true) }

func benchTrim(b *testing.B, timeTouch bool) {
	r := newRigOpts(b, Options{Protocol: blkif.X86_64, MaxIndirectSegments: 256}, 1<<20, ring.Options{MaxIndirectSegments: 256})
	f := r.f
	b.SetBytes(int64(f.dataPages()) * pageSize)
	for b.Loop() {
		if !timeTouch {
			b.StopTimer()
		}
		for i := range f.tags {
			mem := f.tags[i].mem
			for p := 0; p < len(mem); p += pageSize {
				mem[p] = 1
			}
		}
		if timeTouch {
			b.StopTimer()
		} else {
			b.StartTimer()
		}
		if err := f.Trim(); err != nil {
			b.Fatal(err)
		}
		if timeTouch {
			b.StartTimer()
		}
	}
}
