package testutil

import (
	"bytes"
	"sync"
	"testing"
	"time"
)

// Completions records what a Completer hears (the interface of
// image.Completer and nbd.Completer): each cookie's data (a copy, nil for
// none) and error, and the number of CompleteBatch calls. A cookie that
// completes twice panics: no call may complete twice.
//
// Data and Errs may be read without the lock once Wait has returned for
// every call started. The batch counts may not: a CompleteBatch can still
// run after the last Complete, so they are read through WaitBatched.
type Completions struct {
	mu   sync.Mutex
	Data map[uint64][]byte
	Errs map[uint64]error
	// batches counts CompleteBatch calls; batched is how many completions
	// had been recorded when the last one came.
	batches, batched int
	n                chan struct{}
}

// NewCompletions makes a Completions that holds up to max completions
// nobody waited for yet.
func NewCompletions(max int) *Completions {
	return &Completions{Data: map[uint64][]byte{}, Errs: map[uint64]error{}, n: make(chan struct{}, max)}
}

// Complete records one completion.
func (c *Completions) Complete(cookie uint64, data []byte, err error) {
	c.mu.Lock()
	if _, dup := c.Errs[cookie]; dup {
		panic("a call completed twice")
	}
	c.Data[cookie], c.Errs[cookie] = bytes.Clone(data), err
	c.mu.Unlock()
	c.n <- struct{}{}
}

// CompleteBatch counts a batch's end.
func (c *Completions) CompleteBatch() {
	c.mu.Lock()
	c.batches++
	c.batched = len(c.Errs)
	c.mu.Unlock()
}

// WaitBatched waits until a CompleteBatch has followed the last of n
// completions, failing t after 10 s, and returns how many CompleteBatch
// calls there have been.
func (c *Completions) WaitBatched(t *testing.T, n int) int {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c.mu.Lock()
		batched, batches := c.batched, c.batches
		c.mu.Unlock()
		if batched >= n {
			return batches
		}
		if time.Now().After(deadline) {
			t.Fatalf("CompleteBatch followed %d of %d completions", batched, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// Wait waits for n more completions, failing t after 10 s, then fails t
// if any completion so far carried an error. Once the calls it waited
// for are all there were, the fields may be read without a lock: each
// completion was recorded before its signal.
func (c *Completions) Wait(t *testing.T, n int) {
	t.Helper()
	for i := range n {
		select {
		case <-c.n:
		case <-time.After(10 * time.Second):
			t.Fatalf("%d of %d calls completed", i, n)
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for cookie, err := range c.Errs {
		if err != nil {
			t.Fatalf("call %d: %v", cookie, err)
		}
	}
}

// Pending is the number of completions nobody waited for yet.
func (c *Completions) Pending() int { return len(c.n) }
