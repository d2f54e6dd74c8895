package worker

import (
	"sync"
	"time"

	"github.com/blktap-go/blktap/formats/image"
)

// throttle limits one disk's I/O to an IOPS and a bandwidth budget, in the
// worker's process so a throttled disk slows nobody else. It schedules each
// request at a theoretical arrival time (GCRA, the token bucket's
// equivalent): a request costs 1/iops seconds of the operation budget and
// n/bandwidth of the byte budget, and waits until both budgets have room,
// allowing a burst of a tenth of a second. Limits change live. Safe for
// concurrent use.
type throttle struct {
	image.Image

	mu        sync.Mutex
	iops      float64 // 0 = unlimited
	bandwidth float64 // bytes/s; 0 = unlimited
	opsTAT    time.Time
	bytesTAT  time.Time
}

const burst = 100 * time.Millisecond

func (t *throttle) set(iops, bandwidth int64) {
	t.mu.Lock()
	t.iops, t.bandwidth = float64(iops), float64(bandwidth)
	t.opsTAT, t.bytesTAT = time.Time{}, time.Time{}
	t.mu.Unlock()
}

// wait blocks until a request of n bytes fits the budgets.
func (t *throttle) wait(n int) {
	t.mu.Lock()
	if t.iops == 0 && t.bandwidth == 0 {
		t.mu.Unlock()
		return
	}
	now := time.Now()
	var at time.Time
	reserve := func(tat *time.Time, cost time.Duration) {
		start := *tat
		if start.Before(now) {
			start = now
		}
		*tat = start.Add(cost)
		if ready := tat.Add(-burst - cost); ready.After(at) {
			at = ready
		}
	}
	if t.iops > 0 {
		reserve(&t.opsTAT, time.Duration(float64(time.Second)/t.iops))
	}
	if t.bandwidth > 0 {
		reserve(&t.bytesTAT, time.Duration(float64(n)*float64(time.Second)/t.bandwidth))
	}
	t.mu.Unlock()
	if d := time.Until(at); d > 0 {
		time.Sleep(d)
	}
}

func (t *throttle) ReadAt(p []byte, off int64) (int, error) {
	t.wait(len(p))
	return t.Image.ReadAt(p, off)
}

func (t *throttle) WriteAt(p []byte, off int64) (int, error) {
	t.wait(len(p))
	return t.Image.WriteAt(p, off)
}

func (t *throttle) Discard(off, length int64) error {
	t.wait(0)
	return t.Image.Discard(off, length)
}
