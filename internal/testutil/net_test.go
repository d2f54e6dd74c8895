package testutil

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// echo accepts one connection and echoes a byte; Serve's error is
// whatever it was told to return.
type echo struct {
	ln  net.Listener
	err error
}

func (e *echo) Serve(_ context.Context, ln net.Listener) error {
	c, err := ln.Accept()
	if err != nil {
		return e.err
	}
	defer c.Close()
	var b [1]byte
	if _, err := c.Read(b[:]); err == nil {
		c.Write(b[:])
	}
	return e.err
}

func (e *echo) Close() error { return e.ln.Close() }

func TestServeDial(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	Serve(t, &echo{ln: ln}, ln)
	c := Dial(t, "unix", sock, 10*time.Second)
	if _, err := c.Write([]byte{7}); err != nil {
		t.Fatal(err)
	}
	var b [1]byte
	if _, err := c.Read(b[:]); err != nil || b[0] != 7 {
		t.Fatalf("echo: %v %d", err, b[0])
	}
	// The deadline: a read with nothing to come fails, and does not hang.
	c2 := Dial(t, "unix", sock, 50*time.Millisecond)
	if _, err := c2.Read(b[:]); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past the deadline: %v", err)
	}
}

// TestServeError: a Serve that fails fails the test that started it.
func TestServeError(t *testing.T) {
	ft := &fakeT{TB: t}
	sock := filepath.Join(t.TempDir(), "s")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	Serve(ft, &echo{ln: ln, err: errors.New("boom")}, ln)
	for i := len(ft.cleanups) - 1; i >= 0; i-- {
		ft.cleanups[i]()
	}
	if !ft.failed {
		t.Fatal("a Serve error did not fail the test")
	}
}

// fakeT records Errorf and cleanups instead of acting on them.
type fakeT struct {
	testing.TB
	failed   bool
	cleanups []func()
}

func (f *fakeT) Helper()                        {}
func (f *fakeT) Errorf(format string, a ...any) { f.failed = true }
func (f *fakeT) Cleanup(fn func())              { f.cleanups = append(f.cleanups, fn) }
