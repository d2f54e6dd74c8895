package main

// Issue 17 item 6: params the daemon cannot parse fail at once, and a
// detach leaves nothing in the daemon's log to alarm anyone.

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A malformed nbd: source fails the attach at once with the parser's
// reason, and the device is not retried.
func TestEndToEndBadNBDURI(t *testing.T) {
	_, _, d := idleDaemon(t)
	for _, uri := range []string{"nbd:nbd+unix:///", "nbd:nbd://host:99999/", "nbd:nbds+unix:///?socket=/x"} {
		start := time.Now()
		_, err := d.blktap("attach", "0", uri, "xvdc", "r", "--timeout", "20s")
		took := time.Since(start)
		if err == nil {
			t.Fatalf("attach %s succeeded", uri)
		}
		if !strings.Contains(err.Error(), "bad NBD URI") {
			t.Errorf("attach %s: %v; want the URI parser's reason", uri, err)
		}
		if took > 5*time.Second {
			t.Errorf("attach %s took %v to fail", uri, took)
		}
		if rows := d.ls(); len(rows) != 0 {
			t.Fatalf("failed attach of %s left %+v", uri, rows)
		}
	}
	b, _ := os.ReadFile(d.logPath)
	if n := strings.Count(string(b), "level=WARN msg=retrying"); n > 0 {
		t.Errorf("the daemon retried a malformed URI %d times:\n%s", n, b)
	}
}

// Detach is the normal end of a disk: nothing in the daemon's log is an
// ERROR, and the image is opened once per attach, never again after a detach.
func TestEndToEndDetachQuiet(t *testing.T) {
	bin, _, d := idleDaemon(t)
	img := filepath.Join(t.TempDir(), "q.raw")
	if out, err := exec.Command(bin, "image", "create", "-f", "raw", img, "8M").CombinedOutput(); err != nil {
		t.Fatalf("image create: %v %s", err, out)
	}
	const cycles = 5
	for i := 0; i < cycles; i++ {
		d.attachURI("0", "aio:"+img, "xvdc", "w")
		if _, err := d.blktap("detach", "0", "xvdc"); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(time.Second) // a worker started after the detach would be by now
	b, err := os.ReadFile(d.logPath)
	if err != nil {
		t.Fatal(err)
	}
	log := string(b)
	if strings.Contains(log, "level=ERROR") || strings.Contains(log, "msg=retrying") {
		t.Errorf("detach logged an ERROR or a retry:\n%s", log)
	}
	if n := strings.Count(log, "worker started"); n != cycles {
		t.Errorf("%d attaches started %d workers:\n%s", cycles, n, log)
	}
}
