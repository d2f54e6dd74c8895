package xen

import (
	"context"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Every per-request data-page map is an mmap of its own, so a VMA of its
// own, and mmap fails with ENOMEM once a process has vm.max_map_count of
// them (65530 by default), which the ring would report as grant errors. The Go runtime, the images' files
// and the persistent caches need VMAs too, so per-request maps of all
// the rings of a process share a budget well below the limit.
const (
	// maxTransientCap bounds the process budget however high
	// max_map_count is.
	maxTransientCap = 16384
	// minTransientCap is what the largest request can need at once
	// (every indirect segment plus its indirect pages): below it such a
	// request could never be mapped.
	minTransientCap = 8*512 + 8
	// defaultMapCount is the kernel's default vm.max_map_count, assumed
	// when it cannot be read.
	defaultMapCount = 65530
	// reserveWait bounds a wait for mappings. Rings release theirs after
	// each batch, so only an image stuck in I/O elsewhere makes it run
	// out; the request then fails instead of stalling its ring forever.
	reserveWait = 30 * time.Second
)

// transientCap is the process budget of per-request maps for a given
// vm.max_map_count (0 when unreadable): a quarter of it, within
// [minTransientCap, maxTransientCap].
func transientCap(mapCount int) int {
	if mapCount <= 0 {
		mapCount = defaultMapCount
	}
	return min(maxTransientCap, max(minTransientCap, mapCount/4))
}

func readMapCount() int {
	b, err := os.ReadFile("/proc/sys/vm/max_map_count")
	if err != nil {
		return 0
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0
	}
	return n
}

// processMaps is the budget every Transport of this process draws from.
var processMaps = sync.OnceValue(func() *mapBudget { return newMapBudget(transientCap(readMapCount())) })

// mapBudget counts mappings against a fixed size. Waiters are served in
// arrival order and a TryTake fails while anyone waits, so a large
// request is not starved by a stream of small ones. Safe for concurrent
// use.
type mapBudget struct {
	mu      sync.Mutex
	size    int
	used    int
	waiters []*mapWaiter
}

type mapWaiter struct {
	n     int
	ready chan struct{} // closed once the n are taken for the waiter
}

func newMapBudget(size int) *mapBudget { return &mapBudget{size: size} }

// tryTake takes n if they are free and nobody waits.
func (b *mapBudget) tryTake(n int) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.waiters) == 0 && b.used+n <= b.size {
		b.used += n
		return true
	}
	return false
}

// take waits up to d, and until ctx is done, for n (at most the size) and
// reports whether it got them.
func (b *mapBudget) take(ctx context.Context, n int, d time.Duration) bool {
	b.mu.Lock()
	if len(b.waiters) == 0 && b.used+n <= b.size {
		b.used += n
		b.mu.Unlock()
		return true
	}
	w := &mapWaiter{n: n, ready: make(chan struct{})}
	b.waiters = append(b.waiters, w)
	b.mu.Unlock()

	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-w.ready:
		return true
	case <-timer.C:
	case <-ctx.Done():
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	select {
	case <-w.ready:
		// Granted while the timer fired: keep it.
		return true
	default:
	}
	for i, x := range b.waiters {
		if x == w {
			b.waiters = append(b.waiters[:i], b.waiters[i+1:]...)
			break
		}
	}
	// A large waiter leaving the head may let smaller ones behind it in.
	b.grantLocked()
	return false
}

// give returns n taken earlier.
func (b *mapBudget) give(n int) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.used -= n
	b.grantLocked()
}

func (b *mapBudget) grantLocked() {
	for len(b.waiters) > 0 {
		w := b.waiters[0]
		if b.used+w.n > b.size {
			return
		}
		b.used += w.n
		close(w.ready)
		b.waiters[0] = nil
		b.waiters = b.waiters[1:]
	}
}

// inUse reports the mappings taken.
func (b *mapBudget) inUse() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}

// waiting reports how many wait to take.
func (b *mapBudget) waiting() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.waiters)
}
