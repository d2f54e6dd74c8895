package worker

import (
	"sync"
	"testing"
	"time"
)

// timeReads issues n reads of size bytes from each of workers goroutines
// through t and returns how long they all took.
func timeReads(t *throttle, workers, n, size int) time.Duration {
	start := time.Now()
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]byte, size)
			for range n {
				t.ReadAt(p, 0)
			}
		}()
	}
	wg.Wait()
	return time.Since(start)
}

// The budgets are a floor on the time a run takes: a loaded machine only
// makes it slower, so the lower bounds are exact and the upper bounds
// generous. With a budget of r per second and a burst of a tenth of a
// second, k requests of equal cost c take (k-1)*c - burst.
func TestThrottleLimits(t *testing.T) {
	tests := []struct {
		name            string
		iops, bandwidth int64
		workers, n      int
		size            int
		min             time.Duration
	}{
		// 100 IOPS: 10 ms per request; 61 requests: 600 ms - 100 ms.
		{"iops", 100, 0, 1, 61, 512, 500 * time.Millisecond},
		// 1 MB/s, 50 kB requests: 50 ms each; 13: 600 ms - 100 ms.
		{"bandwidth", 0, 1_000_000, 1, 13, 50_000, 500 * time.Millisecond},
		// Both set: the stricter budget decides (bandwidth here, 50 ms
		// against 10 ms).
		{"both, bandwidth stricter", 100, 1_000_000, 1, 13, 50_000, 500 * time.Millisecond},
		// Concurrent callers share one budget: 4 x 16 = 64 requests.
		{"iops, concurrent callers", 100, 0, 4, 16, 512, 530 * time.Millisecond},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			th := &throttle{Image: &fakeImage{}}
			th.set(tc.iops, tc.bandwidth)
			took := timeReads(th, tc.workers, tc.n, tc.size)
			if took < tc.min || took > tc.min+5*time.Second {
				t.Fatalf("%d requests took %v, want at least %v", tc.workers*tc.n, took, tc.min)
			}
		})
	}
}

// The burst lets a tenth of a second's budget through at once: a short
// burst on an idle disk is not slowed.
func TestThrottleBurst(t *testing.T) {
	th := &throttle{Image: &fakeImage{}}
	th.set(100, 0) // 11 requests fit: 0..10 ms of cost within 100 ms of burst
	if took := timeReads(th, 1, 11, 512); took > 50*time.Millisecond {
		t.Fatalf("a burst of 11 requests at 100 IOPS took %v, want no wait", took)
	}
}

// Zero limits mean unlimited, and are the default.
func TestThrottleUnlimited(t *testing.T) {
	for _, set := range []bool{false, true} {
		th := &throttle{Image: &fakeImage{}}
		if set {
			th.set(0, 0)
		}
		if took := timeReads(th, 2, 5000, 1<<20); took > 2*time.Second {
			t.Fatalf("10000 unlimited requests of 1 MiB took %v", took)
		}
	}
}

// Limits change live: a new limit starts from a clean budget, so lifting
// a tight limit frees the next request at once.
func TestThrottleSetIsLive(t *testing.T) {
	th := &throttle{Image: &fakeImage{}}
	th.set(1, 0)
	timeReads(th, 1, 1, 512) // one request spends the second's budget: the next would wait ~0.9 s
	th.set(0, 0)
	if took := timeReads(th, 1, 1, 512); took > 200*time.Millisecond {
		t.Fatalf("after lifting the limit a request waited %v", took)
	}
	th.set(1, 0)
	timeReads(th, 1, 1, 512)
	th.set(1000, 0)
	if took := timeReads(th, 1, 10, 512); took > 200*time.Millisecond {
		t.Fatalf("after raising the limit to 1000 IOPS, 10 requests took %v", took)
	}
}

// Every call through the throttle is metered, per operation.
func TestThrottleMeters(t *testing.T) {
	th := &throttle{Image: &fakeImage{}}
	p := make([]byte, 512)
	th.ReadAt(p, 0)
	th.ReadAt(p, 0)
	th.WriteAt(p, 0)
	th.Flush()
	th.Discard(0, 512)
	hist, inFlight := th.meter.snapshot()
	want := map[string]uint64{"read": 2, "write": 1, "flush": 1, "discard": 1}
	for op, n := range want {
		if hist[op].Count != n {
			t.Errorf("%s: %d counted, want %d", op, hist[op].Count, n)
		}
	}
	if inFlight != 0 {
		t.Errorf("%d in flight after every call returned", inFlight)
	}
}

// BenchmarkGateThrottleRead4k: what the worker's own layers (QoS off, the
// gate open) add to every 4 KiB read a ring or the export makes.
func BenchmarkGateThrottleRead4k(b *testing.B) {
	th := &throttle{Image: &gate{img: &fakeImage{}}}
	p := make([]byte, 4096)
	b.SetBytes(int64(len(p)))
	b.RunParallel(func(pb *testing.PB) {
		q := make([]byte, len(p))
		for pb.Next() {
			th.ReadAt(q, 0)
		}
	})
}
