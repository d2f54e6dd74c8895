package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/oracle"
)

// `blktap xenstored` on its own, and `blktap xenstore ...` against it,
// cross-checked with Xen's own xenstore-utils.
func TestXenstoreCommands(t *testing.T) {
	xsRead := oracle.Require(t, "xenstore-read")
	xsWrite := oracle.Require(t, "xenstore-write")
	xsLs := oracle.Require(t, "xenstore-ls")
	bin := buildBinary(t)
	dir, err := os.MkdirTemp("", "bt-xs-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "xs.sock")
	srv := exec.Command(bin, "xenstored", "--socket", sock)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { srv.Process.Signal(syscall.SIGTERM); srv.Wait() }()
	oracle.WaitListening(t, sock, 10*time.Second)
	ours := func(args ...string) (string, error) {
		out, err := exec.Command(bin, append([]string{"xenstore", "--xenstore", sock}, args...)...).CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	xen := func(tool string, args ...string) string {
		t.Helper()
		cmd := exec.Command(tool, args...)
		cmd.Env = append(os.Environ(), "XENSTORED_PATH="+sock)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s %v: %v %s", tool, args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	if _, err := ours("write", "/a/b", "hello", "/a/c", "world"); err != nil {
		t.Fatal(err)
	}
	if got := xen(xsRead, "/a/b"); got != "hello" {
		t.Fatalf("xenstore-read /a/b = %q", got)
	}
	xen(xsWrite, "/x/y", "from-xen")
	if got, err := ours("read", "/x/y"); err != nil || got != "from-xen" {
		t.Fatalf("read /x/y = %q, %v", got, err)
	}
	if _, err := ours("exists", "/a/b"); err != nil {
		t.Fatalf("exists /a/b: %v", err)
	}
	if _, err := ours("exists", "/a/nope"); err == nil {
		t.Fatal("exists /a/nope succeeded")
	}
	if _, err := ours("mkdir", "/m/n"); err != nil {
		t.Fatal(err)
	}
	if _, err := ours("chmod", "/a/b", "n0", "r5"); err != nil {
		t.Fatal(err)
	}
	if got := xen(xsLs, "-p", "/a"); !strings.Contains(got, "(n0,r5)") {
		t.Fatalf("xenstore-ls -p /a after chmod:\n%s", got)
	}
	if out, err := ours("chmod", "/a/b", "w"); err == nil {
		t.Fatalf("a bare permission letter was accepted: %s", out)
	}
	ls, err := ours("ls", "/a")
	if err != nil || !strings.Contains(ls, `b = "hello"`) || !strings.Contains(ls, `c = "world"`) {
		t.Fatalf("ls /a: %v\n%s", err, ls)
	}
	if _, err := ours("rm", "/a"); err != nil {
		t.Fatal(err)
	}
	if out, err := ours("read", "/a/b"); err == nil || !strings.Contains(out, "ENOENT") {
		t.Fatalf("read after rm: %q %v", out, err)
	}
}
