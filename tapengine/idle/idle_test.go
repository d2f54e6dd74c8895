package idle

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestRingNil(t *testing.T) {
	var b *Doorbell
	b.Ring() // a disk without a poller
}

// TestRingAwake: rings while the poller is awake leave nothing pending.
func TestRingAwake(t *testing.T) {
	var b Doorbell
	b.Ring()
	b.Sleep()
	select {
	case <-b.Wait():
		t.Fatal("a ring from before Sleep woke the sleeper")
	default:
	}
	b.Ring()
	b.Ring()
	select {
	case <-b.Wait():
	case <-time.After(10 * time.Second):
		t.Fatal("no wake after Ring")
	}
	select {
	case <-b.Wait():
		t.Fatal("two wakes for one sleep")
	default:
	}
}

// TestNoOperationMissed runs the contract's two sides against each other:
// operations (counter incremented, then Ring) and a poller that sleeps
// whenever the counter stood still. Every operation must be seen by the
// poller, which would hang on Wait if one were missed.
func TestNoOperationMissed(t *testing.T) {
	var b Doorbell
	var ops atomic.Uint64
	const n = 20000
	seen := make(chan uint64)
	go func() {
		var last uint64
		for last < n {
			b.Sleep()
			if v := ops.Load(); v != last {
				b.Awake()
				last = v
				continue
			}
			select {
			case <-b.Wait():
			case <-time.After(10 * time.Second):
				seen <- last
				return
			}
			last = ops.Load()
		}
		seen <- last
	}()
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < n/4; i++ {
				ops.Add(1)
				b.Ring()
			}
		}()
	}
	wg.Wait()
	if got := <-seen; got != n {
		t.Fatalf("poller stuck asleep at %d of %d operations", got, n)
	}
}
