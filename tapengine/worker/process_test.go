package worker

import (
	"io"
	"os"
	"os/exec"
	"testing"
	"time"
)

// TestWatchHoldsNoThread: the daemon watches one worker per disk, so a
// watch must not hold an OS thread (a goroutine blocked in wait(2) does:
// 1024 disks were 1024 threads). Each exit must still be seen, with its
// status.
func TestWatchHoldsNoThread(t *testing.T) {
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Fatal(err)
	}
	threads := func() int {
		ents, err := os.ReadDir("/proc/self/task")
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	const n = 40
	before := threads()
	var ps []*Process
	defer func() {
		for _, p := range ps {
			p.Kill()
		}
	}()
	for range n {
		p, err := StartAdoptable(sleep, []string{"60"}, io.Discard, nil)
		if err != nil {
			t.Fatal(err)
		}
		ps = append(ps, p)
	}
	time.Sleep(300 * time.Millisecond) // every watcher parked
	if more := threads() - before; more > n/4 {
		t.Errorf("watching %d processes took %d more threads", n, more)
	}
	for _, p := range ps {
		p.Kill()
	}
	for i, p := range ps {
		select {
		case <-p.Done():
		case <-time.After(10 * time.Second):
			t.Fatalf("process %d: exit not seen", i)
		}
		if ee, ok := p.ExitErr().(*exec.ExitError); !ok || ee.ExitCode() != -1 {
			t.Fatalf("process %d: exit %v, want killed", i, p.ExitErr())
		}
	}
}
