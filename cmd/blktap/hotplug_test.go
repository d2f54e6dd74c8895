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

// hotplug add with no daemon fails at once and names the socket, whether
// there is no socket or a stale one nobody listens on; a daemon that
// accepts but answers late (stopped by SIGSTOP, or busy) gets the add's
// timeout, and its failure names the socket too.
func TestHotplugAddWithoutDaemon(t *testing.T) {
	for _, c := range []struct {
		name     string
		setup    func(t *testing.T, sock string)
		max, min time.Duration
	}{
		{"no socket", func(*testing.T, string) {}, time.Second, 0},
		{"stale socket", func(t *testing.T, sock string) {
			l, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			l.(*net.UnixListener).SetUnlinkOnClose(false)
			l.Close()
		}, time.Second, 0},
		{"never answers", func(t *testing.T, sock string) {
			l, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() }) // accepted by the kernel's backlog, never answered
		}, 4 * time.Second, 2 * time.Second},
	} {
		state := t.TempDir()
		sock := filepath.Join(state, reconciler.APISocket)
		c.setup(t, sock)
		t0 := time.Now()
		err := hotplugAdd(context.Background(), state, "", "/local/domain/0/backend/vbd/7/51712", 2*time.Second)
		took := time.Since(t0)
		if err == nil {
			t.Fatalf("%s: hotplug add succeeded with no daemon", c.name)
		}
		if !strings.Contains(err.Error(), sock) {
			t.Errorf("%s: the error does not name %s: %v", c.name, sock, err)
		}
		if took > c.max || took < c.min {
			t.Errorf("%s: failed after %v, want between %v and %v", c.name, took, c.min, c.max)
		}
		t.Logf("%s: %v after %v", c.name, err, took.Round(time.Millisecond))
	}
}
