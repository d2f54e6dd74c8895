package ring

import (
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// TestIndexStoreLoadOrder is the store-buffer litmus test that the ring's
// wake-up protocol rests on: each side publishes its own index and then
// reads the peer's (a producer publishing rsp_prod then reading
// rsp_event; a consumer setting rsp_event then re-reading rsp_prod). If
// both reads can miss both stores, a response is published that nobody
// is told about and the frontend sleeps forever. On x86 a plain store may
// pass a later load; store32 must be a full barrier, also under the race
// detector, whose Go atomic store is a release store only (a
// `go test -race` run of TestEndToEnd hung that way).
func TestIndexStoreLoadOrder(t *testing.T) {
	if runtime.GOMAXPROCS(0) < 2 {
		t.Skip("needs two threads running at once")
	}
	rounds := 200000
	if testing.Short() {
		rounds = 20000
	}
	// Shared memory, as the ring is (the race detector does not watch
	// it, so only the hardware's ordering is tested).
	mem, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	const x, y = 0, 64 // separate cache lines, as the ring's indices may be
	var start [2]atomic.Uint32
	var seen [2][]uint32
	seen[0] = make([]uint32, rounds)
	seen[1] = make([]uint32, rounds)
	var wg sync.WaitGroup
	side := func(me int, mine, peer int) {
		defer wg.Done()
		for i := 1; i <= rounds; i++ {
			// Meet the other side, so both rounds overlap.
			start[me].Store(uint32(i))
			for start[1-me].Load() < uint32(i) {
			}
			store32(mem, mine, uint32(i))
			seen[me][i-1] = load32(mem, peer)
		}
	}
	wg.Add(2)
	go side(0, x, y)
	go side(1, y, x)
	wg.Wait()
	for i := range rounds {
		// Round i+1: at least one side must see the other's store.
		if seen[0][i] < uint32(i+1) && seen[1][i] < uint32(i+1) {
			t.Fatalf("round %d: each side missed the other's store (saw %d and %d): store32 is not a full barrier",
				i+1, seen[0][i], seen[1][i])
		}
	}
}
