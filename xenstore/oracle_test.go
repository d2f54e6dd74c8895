package xenstore

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/oracle"
)

// startServer runs an embedded server on a fresh socket for one test.
func startServer(t testing.TB) (string, *Server) {
	t.Helper()
	dir, err := os.MkdirTemp("", "xs")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "sock")
	srv := NewServer(nil)
	errc := make(chan error, 1)
	go func() { errc <- srv.ListenAndServe(sock) }()
	for i := 0; ; i++ {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		select {
		case err := <-errc:
			t.Fatalf("server: %v", err)
		case <-time.After(5 * time.Millisecond):
		}
	}
	t.Cleanup(func() {
		srv.Close()
		if err := <-errc; err != ErrServerClosed {
			t.Errorf("ListenAndServe returned %v", err)
		}
		os.RemoveAll(dir)
	})
	return sock, srv
}

// xsTool runs one of Xen's xenstore-utils against sock.
func xsTool(t *testing.T, sock string, tool string, args ...string) (string, error) {
	t.Helper()
	bin := oracle.Require(t, tool)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), "XENSTORED_PATH="+sock)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func TestXenstoreUtils(t *testing.T) {
	sock, _ := startServer(t)
	run := func(tool string, args ...string) string {
		t.Helper()
		out, err := xsTool(t, sock, tool, args...)
		if err != nil {
			t.Fatalf("%s %v: %v\n%s", tool, args, err, out)
		}
		return out
	}
	run("xenstore-write", "/vm/1/name", "guest one", "/vm/1/uuid", "u-1", "/vm/2/name", "two")
	if got := run("xenstore-read", "/vm/1/name"); got != "guest one\n" {
		t.Fatalf("read: %q", got)
	}
	if got := run("xenstore-list", "/vm"); got != "1\n2\n" {
		t.Fatalf("list: %q", got)
	}
	got := run("xenstore-ls", "/vm")
	want := "1 = \"\"\n name = \"guest one\"\n uuid = \"u-1\"\n2 = \"\"\n name = \"two\"\n"
	if got != want {
		t.Fatalf("ls:\n%s\nwant:\n%s", got, want)
	}
	run("xenstore-chmod", "/vm/1", "n0", "r3")
	if got := run("xenstore-ls", "-p", "/vm"); !strings.Contains(got, "(n0,r3)") {
		t.Fatalf("ls -p after chmod:\n%s", got)
	}
	// -r applies to children too.
	run("xenstore-chmod", "-r", "/vm/2", "b4")
	if got := run("xenstore-ls", "-p", "/vm/2"); !strings.Contains(got, "(b4)") {
		t.Fatalf("chmod -r:\n%s", got)
	}
	run("xenstore-exists", "/vm/2")
	run("xenstore-rm", "/vm/2")
	if out, err := xsTool(t, sock, "xenstore-exists", "/vm/2"); err == nil {
		t.Fatalf("exists after rm succeeded: %s", out)
	}
	if out, err := xsTool(t, sock, "xenstore-read", "/vm/2/name"); err == nil {
		t.Fatalf("read after rm succeeded: %s", out)
	}
	// Relative paths are under /local/domain/0 for a socket client.
	run("xenstore-write", "rel/k", "v")
	if got := run("xenstore-read", "/local/domain/0/rel/k"); got != "v\n" {
		t.Fatalf("relative: %q", got)
	}
	if got := run("xenstore-read", "-R", "/local/domain/0/rel/k"); got != "v" {
		t.Fatalf("read -R: %q", got)
	}
}

func TestXenstoreWatchTool(t *testing.T) {
	sock, srv := startServer(t)
	bin := oracle.Require(t, "xenstore-watch")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// -n 3: the initial event plus two changes.
	cmd := exec.CommandContext(ctx, bin, "-n", "3", "/watched")
	cmd.Env = append(os.Environ(), "XENSTORED_PATH="+sock)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Write only once the tool's watch is registered.
	for watches(srv) == 0 {
		select {
		case <-ctx.Done():
			t.Fatal("xenstore-watch never registered")
		case <-time.After(2 * time.Millisecond):
		}
	}
	c, err := Dial(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Write(ctx, "/watched/a", "1"); err != nil {
		t.Fatal(err)
	}
	if err := c.Write(ctx, "/unrelated", "1"); err != nil {
		t.Fatal(err)
	}
	if err := c.Rm(ctx, "/watched"); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("xenstore-watch: %v\n%s", err, out.String())
	}
	if got, want := out.String(), "/watched\n/watched/a\n/watched\n"; got != want {
		t.Fatalf("events %q, want %q", got, want)
	}
}

// watches counts the watches registered on srv.
func watches(srv *Server) int {
	n := 0
	srv.Do(func(st *State) {
		for _, c := range st.conns {
			n += len(c.watches)
		}
	})
	return n
}

// TestXenTestSuite runs Xen's own xenstore test suite against the server.
func TestXenTestSuite(t *testing.T) {
	bin := oracle.Require(t, "/usr/lib/xen-4.17/bin/test-xenstore")
	sock, _ := startServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-i", "3")
	cmd.Env = append(os.Environ(), "XENSTORED_PATH="+sock)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("test-xenstore: %v\n%s", err, out)
	}
	// It prints one timing line per passing sub-test.
	for _, name := range []string{"read 1", "write 2000", "dir", "rm dir", "ta rmw", "ta err"} {
		if !strings.Contains(string(out), name) {
			t.Errorf("sub-test %q missing from output:\n%s", name, out)
		}
	}
}

// TestPyxs drives the server with python3-pyxs, a second independent
// client (reads, writes, permissions, conflicting transactions, watches).
func TestPyxs(t *testing.T) {
	py := oracle.Require(t, "/usr/bin/python3")
	if err := exec.Command(py, "-c", "import pyxs").Run(); err != nil {
		if oracle.InCI() {
			t.Fatal("python3-pyxs missing (apt-get install python3-pyxs): required under CI")
		}
		t.Skip("python3-pyxs missing (apt-get install python3-pyxs)")
	}
	sock, _ := startServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, py, "testdata/pyxs/check.py", sock).CombinedOutput()
	if err != nil || !strings.HasSuffix(string(out), "PASS\n") {
		t.Fatalf("pyxs: %v\n%s", err, out)
	}
}
