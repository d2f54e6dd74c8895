// Package idle lets a disk's idle-time housekeeping sleep while the disk
// is idle, instead of polling it forever.
//
// Contract: a poller that has nothing left to do until the next I/O calls
// Doorbell.Sleep, re-reads its activity counters, and then waits on
// Doorbell.Wait; the I/O path calls Doorbell.Ring once per operation,
// before the operation shows in those counters (or while it shows as in
// flight). Ring costs one atomic load while the poller is awake, so the I/O
// path pays almost nothing, and an idle disk's poller wakes for nothing at
// all. Because Ring runs before the operation is visible and Sleep before
// the re-read, either the re-read sees the operation or Ring sees the
// sleeper: no operation is missed.
package idle

import "sync/atomic"

// Doorbell wakes one sleeping poller. The zero value is ready to use; a
// nil *Doorbell ignores Ring (a disk without a poller).
type Doorbell struct {
	asleep atomic.Bool
	ch     chan struct{} // made by the poller before its first Sleep
}

func (b *Doorbell) channel() chan struct{} {
	// Ring reads ch only after it sees asleep, which Sleep stores after
	// this: the atomic orders the two.
	if b.ch == nil {
		b.ch = make(chan struct{}, 1)
	}
	return b.ch
}

// Sleep announces that the poller is about to wait; it must re-read the
// activity it watches after Sleep and before Wait. Poller only.
func (b *Doorbell) Sleep() {
	b.channel()
	b.asleep.Store(true)
}

// Awake takes back a Sleep whose re-read found new activity. Poller only.
func (b *Doorbell) Awake() { b.asleep.Store(false) }

// Wait returns the channel that receives once an operation has rung
// after Sleep. Poller only.
func (b *Doorbell) Wait() <-chan struct{} { return b.channel() }

// Ring tells a sleeping poller that an operation has started. Any
// goroutine, any number of times; nil-safe.
func (b *Doorbell) Ring() {
	if b == nil || !b.asleep.Load() {
		return
	}
	if b.asleep.CompareAndSwap(true, false) {
		select {
		case b.ch <- struct{}{}:
		default: // a wake is pending already
		}
	}
}
