package main

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/reconciler"
)

// hotplug add with no daemon to answer fails fast and names the socket,
// both when nothing listens and when something listens but never answers
// (a daemon stopped with SIGSTOP): libxl would otherwise wait its own,
// much longer, timeout. The budget is the script's 5 s (blktap(8)) less the
// time a process takes to start.
func TestHotplugAddWithoutDaemon(t *testing.T) {
	for _, listening := range []bool{false, true} {
		state := t.TempDir()
		sock := filepath.Join(state, reconciler.APISocket)
		if listening {
			l, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close() // accepted by the kernel's backlog, never answered
		}
		t0 := time.Now()
		err := hotplugAdd(context.Background(), state, "", "/local/domain/0/backend/vbd/7/51712", 30*time.Second)
		took := time.Since(t0)
		if err == nil {
			t.Fatalf("listening=%v: hotplug add succeeded with no daemon", listening)
		}
		if !strings.Contains(err.Error(), sock) {
			t.Errorf("listening=%v: the error does not name %s: %v", listening, sock, err)
		}
		if took > 4500*time.Millisecond {
			t.Errorf("listening=%v: failed after %v; the script has 5 s in all", listening, took)
		}
		t.Logf("listening=%v: %v after %v", listening, err, took.Round(time.Millisecond))
	}
}

// The wait counts from the process's start: a process that started long
// ago (this test's) gets the minimum, and the age read is plausible.
func TestDaemonAnswerWithin(t *testing.T) {
	age := sinceProcessStart()
	if age <= 0 || age > time.Hour {
		t.Fatalf("this process started %v ago?", age)
	}
	time.Sleep(50 * time.Millisecond)
	if later := sinceProcessStart(); later <= age {
		t.Errorf("the age did not grow: %v then %v", age, later)
	}
	want := daemonAnswerBy - age
	if want < time.Second {
		want = time.Second
	}
	if got := daemonAnswerWithin(); got > want || got < want-time.Second {
		t.Errorf("daemonAnswerWithin %v, want about %v (process age %v)", got, want, age)
	}
}
