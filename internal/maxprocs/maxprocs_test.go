package maxprocs

import (
	"runtime"
	"testing"
)

func TestAtLeastTwo(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(0))
	t.Setenv("GOMAXPROCS", "")
	runtime.GOMAXPROCS(1)
	if n := AtLeastTwo(); n != 2 {
		t.Fatalf("one CPU: %d Ps, want 2", n)
	}
	runtime.GOMAXPROCS(3)
	if n := AtLeastTwo(); n != 3 {
		t.Fatalf("three CPUs: %d Ps, want 3 left alone", n)
	}
	t.Setenv("GOMAXPROCS", "1") // the operator's word stands
	runtime.GOMAXPROCS(1)
	if n := AtLeastTwo(); n != 1 {
		t.Fatalf("GOMAXPROCS=1 set: %d Ps", n)
	}
}
