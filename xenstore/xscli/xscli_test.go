package xscli

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/oracle"
	"github.com/blktap-go/blktap/xenstore"
)

func serve(t *testing.T) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "xs.sock")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int)
	go func() { done <- Xenstored(ctx, []string{"--socket", sock}, os.Stderr) }()
	t.Cleanup(func() {
		cancel()
		if rc := <-done; rc != 0 {
			t.Errorf("xenstored exited %d", rc)
		}
	})
	// A loaded machine once ran the first client between bind and
	// listen, and it was refused.
	oracle.WaitListening(t, sock, 10*time.Second)
	return sock
}

func cli(t *testing.T, sock string, args ...string) (string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	rc := Xenstore(ctx, append([]string{"--socket", sock}, args...), &out, &errb)
	return out.String() + errb.String(), rc
}

func TestCLIAgainstXenTools(t *testing.T) {
	sock := serve(t)
	xr := oracle.Require(t, "xenstore-read")
	xw := oracle.Require(t, "xenstore-write")
	env := append(os.Environ(), "XENSTORED_PATH="+sock)
	if out, rc := cli(t, sock, "write", "/c/a", "va", "/c/b/x", "vx"); rc != 0 {
		t.Fatalf("write: %d %s", rc, out)
	}
	cmd := exec.Command(xr, "/c/a", "/c/b/x")
	cmd.Env = env
	if out, err := cmd.CombinedOutput(); err != nil || string(out) != "va\nvx\n" {
		t.Fatalf("xenstore-read: %q %v", out, err)
	}
	cmd = exec.Command(xw, "/c/from-xen", "hello")
	cmd.Env = env
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("xenstore-write: %s %v", out, err)
	}
	if out, rc := cli(t, sock, "read", "/c/from-xen"); rc != 0 || out != "hello\n" {
		t.Fatalf("read: %d %q", rc, out)
	}
	if out, rc := cli(t, sock, "ls", "/c"); rc != 0 || out != "a = \"va\"\nb = \"\"\n x = \"vx\"\nfrom-xen = \"hello\"\n" {
		t.Fatalf("ls: %d %q", rc, out)
	}
	if out, rc := cli(t, sock, "chmod", "-r", "/c/b", "n0", "r7"); rc != 0 {
		t.Fatalf("chmod: %d %s", rc, out)
	}
	if out, rc := cli(t, sock, "ls", "-p", "/c/b"); rc != 0 || !strings.Contains(out, "(n0,r7)") {
		t.Fatalf("ls -p: %d %q", rc, out)
	}
	if out, rc := cli(t, sock, "list", "/c"); rc != 0 || out != "a\nb\nfrom-xen\n" {
		t.Fatalf("list: %d %q", rc, out)
	}
	if _, rc := cli(t, sock, "exists", "/c/b"); rc != 0 {
		t.Fatal("exists /c/b")
	}
	if out, rc := cli(t, sock, "rm", "/c/b"); rc != 0 {
		t.Fatalf("rm: %s", out)
	}
	if _, rc := cli(t, sock, "exists", "/c/b"); rc != 1 {
		t.Fatal("exists after rm")
	}
	if out, rc := cli(t, sock, "read", "/c/b"); rc != 1 || !strings.Contains(out, "ENOENT") {
		t.Fatalf("read missing: %d %q", rc, out)
	}
	if _, rc := cli(t, sock, "bogus"); rc != 2 {
		t.Fatal("unknown command")
	}
	if _, rc := cli(t, sock, "write", "/odd"); rc != 2 {
		t.Fatal("odd write args")
	}
	if out, rc := cli(t, sock, "mkdir", "/c/m"); rc != 0 {
		t.Fatalf("mkdir: %s", out)
	}
}

func TestCLIWatch(t *testing.T) {
	sock := serve(t)
	ctx := context.Background()
	c, err := xenstore.Dial(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	done := make(chan string)
	go func() {
		out, _ := cli(t, sock, "watch", "-n", "2", "/wt")
		done <- out
	}()
	// The first event is the registration; write until the second lands.
	for {
		select {
		case out := <-done:
			if !strings.HasPrefix(out, "/wt\n/wt") {
				t.Fatalf("watch printed %q", out)
			}
			return
		case <-time.After(5 * time.Millisecond):
			c.Write(ctx, "/wt/k", "v")
		}
	}
}
