package nbd

import (
	"net"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestGrowSendBuffer: a unix connection gets room for a 1 MiB reply in
// one piece (as root, past wmem_max); TCP is left to size its own.
func TestGrowSendBuffer(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()

	before := sendBuffer(t, server)
	growSendBuffer(server)
	after := sendBuffer(t, server)
	t.Logf("SO_SNDBUF %d -> %d", before, after)
	if os.Geteuid() == 0 && after < unixSendBuffer {
		t.Fatalf("SO_SNDBUF %d as root, want at least %d", after, unixSendBuffer)
	}
	if after < before {
		t.Fatalf("SO_SNDBUF shrank: %d -> %d", before, after)
	}
}

func sendBuffer(t *testing.T, c net.Conn) int {
	t.Helper()
	raw, err := c.(*net.UnixConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	var gerr error
	raw.Control(func(fd uintptr) { n, gerr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF) })
	if gerr != nil {
		t.Fatal(gerr)
	}
	return n
}
