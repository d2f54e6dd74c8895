package parallel

import (
	"errors"
	"sync/atomic"
	"testing"
)

// fakeT records Fatal instead of stopping the goroutine, so the test can
// see that Run fails on a worker's error.
type fakeT struct {
	testing.TB
	failed atomic.Bool
}

func (f *fakeT) Helper()           {}
func (f *fakeT) Fatal(args ...any) { f.failed.Store(true) }

func TestRunAllAndFail(t *testing.T) {
	var ran atomic.Int32
	ft := &fakeT{}
	Run(ft, 8, func(w int) error {
		ran.Add(1)
		return nil
	})
	if ran.Load() != 8 || ft.failed.Load() {
		t.Fatalf("ran %d of 8, failed %v; want all, no failure", ran.Load(), ft.failed.Load())
	}
	Run(ft, 4, func(w int) error {
		if w == 2 {
			return errors.New("worker 2")
		}
		return nil
	})
	if !ft.failed.Load() {
		t.Fatal("a worker's error did not fail the test")
	}
}
