package worker

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/tapengine/idle"
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
	meter meter

	// limited says a limit is set, so that an unlimited disk's I/O takes
	// no lock. A request racing with set may go by the old limits.
	limited   atomic.Bool
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
	t.limited.Store(iops > 0 || bandwidth > 0)
	t.mu.Unlock()
}

// wait blocks until a request of n bytes fits the budgets.
func (t *throttle) wait(n int) {
	if !t.limited.Load() {
		return
	}
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
	defer t.meter.end(opRead, t.meter.start())
	return t.Image.ReadAt(p, off)
}

func (t *throttle) WriteAt(p []byte, off int64) (int, error) {
	t.wait(len(p))
	defer t.meter.end(opWrite, t.meter.start())
	return t.Image.WriteAt(p, off)
}

func (t *throttle) Discard(off, length int64) error {
	t.wait(0)
	defer t.meter.end(opDiscard, t.meter.start())
	return t.Image.Discard(off, length)
}

func (t *throttle) Flush() error {
	defer t.meter.end(opFlush, t.meter.start())
	return t.Image.Flush()
}

// Image operations the meter times.
const (
	opRead = iota
	opWrite
	opFlush
	opDiscard
	numOps
)

var opNames = [numOps]string{"read", "write", "flush", "discard"}

// LatencyBounds are the upper bounds, in seconds, of the latency
// histogram's buckets (the last, +Inf, is implied).
var LatencyBounds = []float64{10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1}

// meter counts the image operations in flight and times each one, for
// the disk's metrics. Lock-free: typed atomics only.
type meter struct {
	bell     idle.Doorbell // wakes the idle trimmer (idle.go)
	inFlight atomic.Int64
	ops      [numOps]struct {
		buckets [16]atomic.Uint64 // len(LatencyBounds)+1
		sumNs   atomic.Uint64
	}
}

// start counts an operation in flight and returns its start time, for
// end. A deferred end(op, start()) calls start at once: the pair is two
// plain calls where a returned closure cost an allocation per I/O.
func (m *meter) start() time.Time {
	m.inFlight.Add(1)
	m.bell.Ring() // after inFlight: a trimmer about to sleep sees one or the other
	return time.Now()
}

// end finishes an operation of kind op that start began at t0.
func (m *meter) end(op int, t0 time.Time) {
	m.inFlight.Add(-1)
	m.record(op, time.Since(t0), 1)
}

// record counts n operations of kind op that took d each.
func (m *meter) record(op int, d time.Duration, n int) {
	if n == 0 {
		return
	}
	o := &m.ops[op]
	o.sumNs.Add(uint64(d) * uint64(n))
	sec := d.Seconds()
	i := 0
	for i < len(LatencyBounds) && sec > LatencyBounds[i] {
		i++
	}
	o.buckets[i].Add(uint64(n))
}

// Histogram is one operation's latencies: Buckets[i] counts operations no
// slower than LatencyBounds[i] and slower than the bound before (the last
// bucket: slower than every bound).
type Histogram struct {
	// Bounds are the buckets' upper bounds in seconds (LatencyBounds at
	// the worker that counted), so a reader needs no table of its own.
	Bounds  []float64 `json:"le_seconds,omitempty"`
	Buckets []uint64  `json:"buckets"`
	SumSec  float64   `json:"sum_seconds"`
	Count   uint64    `json:"count"`
}

func (m *meter) snapshot() (map[string]Histogram, int64) {
	out := map[string]Histogram{}
	for op := range numOps {
		o := &m.ops[op]
		h := Histogram{Bounds: LatencyBounds, Buckets: make([]uint64, len(LatencyBounds)+1)}
		for i := range h.Buckets {
			h.Buckets[i] = o.buckets[i].Load()
			h.Count += h.Buckets[i]
		}
		h.SumSec = float64(o.sumNs.Load()) / 1e9
		out[opNames[op]] = h
	}
	return out, m.inFlight.Load()
}
