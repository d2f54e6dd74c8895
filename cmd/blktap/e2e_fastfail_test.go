package main

// Issue 17 item 6: a client with no daemon answering fails at once, says
// where it looked and how to look elsewhere, and changes nothing; params
// the daemon cannot parse fail at once; a detach is quiet.

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/reconciler"
	"github.com/blktap-go/blktap/xenstore"
)

// startXenstored runs the embedded xenstored alone, as a host's xenstored
// runs while the blktap daemon is down.
func startXenstored(t *testing.T, bin string) (string, *xenstore.Client) {
	t.Helper()
	dir, err := os.MkdirTemp("", "bt-xs-") // unix socket paths are short
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "xs.sock")
	cmd := exec.Command(bin, "xenstored", "--socket", sock)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		xs, err := xenstore.Dial(ctx, sock)
		cancel()
		if err == nil {
			t.Cleanup(func() { xs.Close() })
			return sock, xs
		}
		if time.Now().After(deadline) {
			t.Fatalf("xenstored never answered on %s: %v", sock, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// wantStateDirHint checks that a client's error says which state
// directory it used and both ways to name another.
func wantStateDirHint(t *testing.T, msg, stateDir string) {
	t.Helper()
	for _, w := range []string{stateDir, "--state-dir", "BLKTAP_STATE_DIR"} {
		if !strings.Contains(msg, w) {
			t.Errorf("error lacks %q:\n%s", w, msg)
		}
	}
}

func TestClientNoDaemonFailsFast(t *testing.T) {
	bin := buildBinary(t)
	sock, xs := startXenstored(t, bin)
	img := filepath.Join(t.TempDir(), "a.raw")
	if out, err := exec.Command(bin, "image", "create", "-f", "raw", img, "8M").CombinedOutput(); err != nil {
		t.Fatalf("image create: %v %s", err, out)
	}
	emptyState := t.TempDir()
	// A state directory a killed daemon left: its API socket is there,
	// nobody listens on it.
	staleState, err := os.MkdirTemp("", "bt-stale-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(staleState) })
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(staleState, reconciler.APISocket), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()

	for _, c := range []struct{ name, state string }{{"empty", emptyState}, {"stale", staleState}} {
		for _, args := range [][]string{
			{"attach", "0", "aio:" + img, "xvdc", "w"},
			{"detach", "0", "xvdc"},
		} {
			t.Run(c.name+"/"+args[0], func(t *testing.T) {
				cmd := exec.Command(bin, append(args, "--state-dir", c.state, "--xenstore", sock)...)
				cmd.Env = append(os.Environ(), "BLKTAP_STATE_DIR=")
				start := time.Now()
				out, err := cmd.CombinedOutput()
				took := time.Since(start)
				var ee *exec.ExitError
				if !errors.As(err, &ee) || ee.ExitCode() != 1 {
					t.Fatalf("%v: %v, want exit 1\n%s", args, err, out)
				}
				if took > 2*time.Second {
					t.Errorf("%v took %v to fail, want under 2s", args, took)
				}
				wantStateDirHint(t, string(out), c.state)
				ctx := context.Background()
				for _, kind := range []string{reconciler.KindVBD3, reconciler.KindTap, reconciler.KindVBD} {
					if _, err := xs.Read(ctx, "/local/domain/0/backend/"+kind); !errors.Is(err, xenstore.ErrNotFound) {
						t.Errorf("%v with no daemon left backend/%s in xenstore (%v)", args, kind, err)
					}
				}
				if _, err := xs.Read(ctx, "/local/domain/0/device/vbd"); !errors.Is(err, xenstore.ErrNotFound) {
					t.Errorf("%v with no daemon left a frontend in xenstore (%v)", args, err)
				}
			})
		}
	}
}

// With no daemon and no xenstored, the client's error is about the state
// directory, where the daemon records its xenstored, not only a socket
// path the user never chose.
func TestClientNoXenstoredNamesStateDir(t *testing.T) {
	if _, err := os.Stat(xenstore.DefaultPath()); err == nil {
		t.Skipf("a xenstored runs at %s", xenstore.DefaultPath())
	}
	bin := buildBinary(t)
	state := t.TempDir()
	for _, args := range [][]string{{"ls"}, {"pause", "0", "xvdc"}, {"attach", "0", "ram:x", "xvdc", "w"}} {
		cmd := exec.Command(bin, append(args, "--state-dir", state)...)
		out, err := cmd.CombinedOutput()
		if err == nil {
			t.Fatalf("%v with no daemon succeeded:\n%s", args, out)
		}
		wantStateDirHint(t, string(out), state)
	}
}

// --state-dir before the command is the same option: `blktap --state-dir
// D ls` looks in D; a command's own --state-dir wins over it.
func TestGlobalStateDir(t *testing.T) {
	if _, err := os.Stat(xenstore.DefaultPath()); err == nil {
		t.Skipf("a xenstored runs at %s", xenstore.DefaultPath())
	}
	bin := buildBinary(t)
	global, own := t.TempDir(), t.TempDir()
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--state-dir", global, "ls"}, global},
		{[]string{"--state-dir=" + global, "pause", "0", "xvdc"}, global},
		{[]string{"-state-dir", global, "attach", "0", "ram:x", "xvdc", "w"}, global},
		{[]string{"--state-dir", global, "ls", "--state-dir", own}, own},
	} {
		cmd := exec.Command(bin, c.args...)
		cmd.Env = append(os.Environ(), "BLKTAP_STATE_DIR=")
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 {
			t.Fatalf("%v: %v, want exit 1\n%s", c.args, err, out)
		}
		wantStateDirHint(t, string(out), c.want)
	}
	for _, args := range [][]string{{"--state-dir"}, {"--state-dir="}, {"--state-dir", global}} {
		out, err := exec.Command(bin, args...).CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), "usage: blktap") {
			t.Errorf("%v: %v, want exit 2 with the usage\n%s", args, err, out)
		}
	}
}
