// Package parallel runs a test's concurrent workers and collects their
// errors. It is imported only from _test.go files.
package parallel

import (
	"sync"
	"testing"
)

// Run runs fn(0) to fn(n-1) at once, waits for all of them, and fails t
// with the first error any returned. fn must not call t.Fatal (it runs on
// its own goroutine); it returns the error instead.
func Run(t testing.TB, n int, fn func(w int) error) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for w := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(w); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}
