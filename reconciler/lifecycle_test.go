package reconciler

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// sd_notify: one datagram to a socket path or an abstract name ('@').
func TestNotifier(t *testing.T) {
	for _, abstract := range []bool{false, true} {
		name := filepath.Join(t.TempDir(), "notify")
		addr := name
		if abstract {
			name = fmt.Sprintf("@blktap-test-%d-%d", os.Getpid(), time.Now().UnixNano())
			addr = name
		}
		ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		if err := (notifier{addr: addr}).notify("READY=1"); err != nil {
			t.Fatalf("abstract=%v: %v", abstract, err)
		}
		buf := make([]byte, 64)
		ln.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := ln.Read(buf)
		if err != nil || string(buf[:n]) != "READY=1" {
			t.Errorf("abstract=%v: got %q, %v", abstract, buf[:n], err)
		}
	}
	if err := (notifier{}).notify("READY=1"); err != nil {
		t.Errorf("no NOTIFY_SOCKET: %v", err)
	}
	if err := (notifier{addr: "vsock:2:1"}).notify("READY=1"); err == nil {
		t.Errorf("vsock: want an error")
	}
}

// takeNotifySocket hides the socket from the workers.
func TestTakeNotifySocket(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "/run/systemd/notify")
	n := takeNotifySocket()
	if n.addr != "/run/systemd/notify" || os.Getenv("NOTIFY_SOCKET") != "" {
		t.Errorf("addr %q, env %q", n.addr, os.Getenv("NOTIFY_SOCKET"))
	}
}

// Ready waits for the queue to stay idle, not just to empty once.
func TestWaitConverged(t *testing.T) {
	q := newQueue()
	k1, k2 := Key{Kind: KindVBD3, Domid: 1, Devid: 1}, Key{Kind: KindVBD3, Domid: 1, Devid: 2}
	q.Add(k1)
	got := make(chan bool, 1)
	start := time.Now()
	go func() { got <- waitConverged(context.Background(), q, 200*time.Millisecond, 10*time.Second) }()
	// A reconcile that, like a handshake step, causes another shortly after.
	k, _ := q.Get()
	time.Sleep(50 * time.Millisecond)
	q.Done(k)
	time.Sleep(100 * time.Millisecond)
	q.Add(k2)
	k, _ = q.Get()
	time.Sleep(50 * time.Millisecond)
	q.Done(k)
	if !<-got {
		t.Fatal("never converged")
	}
	if el := time.Since(start); el < 400*time.Millisecond {
		t.Errorf("ready after %v: before the second reconcile had settled", el)
	}
	// A queue that never empties: the limit answers false.
	q.Add(k1)
	if waitConverged(context.Background(), q, 10*time.Millisecond, 100*time.Millisecond) {
		t.Error("converged with a key pending")
	}
}
