// Package testutil holds the set-up that tests in several packages share
// to the letter. It is imported only from _test.go files.
package testutil

import (
	"context"
	"net"
	"testing"
	"time"
)

// Server is what Serve runs: an NBD server, say.
type Server interface {
	Serve(ctx context.Context, ln net.Listener) error
	Close() error
}

// Serve runs s on ln until the test ends, then closes it and fails t if
// Serve returned an error: a server that dies early fails the test that
// used it, not a later one.
func Serve(t testing.TB, s Server, ln net.Listener) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- s.Serve(context.Background(), ln) }()
	t.Cleanup(func() {
		s.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
}

// Dial connects to addr, closed when the test ends; every read and write
// on it fails after limit, so a server that stops answering fails the
// test rather than hanging it.
func Dial(t testing.TB, network, addr string, limit time.Duration) net.Conn {
	t.Helper()
	c, err := net.Dial(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(limit))
	return c
}
