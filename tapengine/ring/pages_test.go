package ring

import (
	"bytes"
	"context"
	"fmt"
	"testing"

	"github.com/blktap-go/blktap/tapengine/blkif"
)

// reserveTransport lends at most limit pages between release points,
// like the Xen transport's mapping budget.
type reserveTransport struct {
	*memTransport
	limit, held, reserved, reserves int
}

func (r *reserveTransport) Page(ref uint32, writable bool) ([]byte, error) {
	switch {
	case r.reserved > 0:
		r.reserved--
	case r.held >= r.limit:
		return nil, ErrPagesBusy
	}
	r.held++
	return r.memTransport.Page(ref, writable)
}

func (r *reserveTransport) ReleasePages() error {
	r.held, r.reserved = 0, 0
	return nil
}

func (r *reserveTransport) ReservePages(_ context.Context, n int) error {
	if r.held != 0 {
		return fmt.Errorf("reserve %d while holding %d", n, r.held)
	}
	r.reserves++
	r.reserved = n
	return nil
}

// TestPagesBusy: when the transport has no mapping to spare, the loop
// answers what it prepared, releases, reserves and maps the request
// again; every request succeeds and is counted once.
func TestPagesBusy(t *testing.T) {
	for _, workers := range []int{0, 4} {
		t.Run(fmt.Sprint("workers=", workers), func(t *testing.T) {
			mt := newMemTransport(t, 0)
			tr := &reserveTransport{memTransport: mt, limit: 5}
			front, err := NewFront(mt.ring, blkif.X86_64)
			if err != nil {
				t.Fatal(err)
			}
			front.Init()
			const n = 6
			for i := range n {
				copy(mt.grant(uint32(100+2*i), false), bytes.Repeat([]byte{byte(i + 1)}, 4096))
				mt.grant(uint32(101+2*i), false)
				r := rw(blkif.OpWrite, uint64(i), uint64(i)*16, seg(uint32(100+2*i), 0, 7), seg(uint32(101+2*i), 0, 7))
				if err := front.Push(&r); err != nil {
					t.Fatal(err)
				}
			}
			front.PushRequests()
			stats := new(Stats)
			img := &memImage{data: make([]byte, 1<<20)}
			s, err := newServer(tr, blkif.X86_64, img, Options{Workers: workers, Stats: stats})
			if err != nil {
				t.Fatal(err)
			}
			defer s.close()
			if err := s.drain(); err != nil {
				t.Fatal(err)
			}
			k, _ := front.Pending()
			for range k {
				var rsp blkif.Response
				front.Next(&rsp)
				if rsp.Status != blkif.StatusOK {
					t.Errorf("response %+v", rsp)
				}
			}
			if k != n || stats.Writes.Load() != n || stats.Errors.Load() != 0 {
				t.Errorf("%d responses, %d writes, %d errors; want %d, %d, 0", k, stats.Writes.Load(), stats.Errors.Load(), n, n)
			}
			if tr.reserves == 0 {
				t.Error("the transport never ran out: nothing tested")
			}
			data, _, _ := img.snapshot()
			for i := range n {
				if data[i*8192] != byte(i+1) {
					t.Errorf("write %d not in the image", i)
				}
			}
		})
	}
}
