package main

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/reconciler"
	"github.com/blktap-go/blktap/xenstore"
)

// fakeXenDaemon plays `blktap run` on a Xen host for one device, as far as
// `blktap attach` can see: the guest connects ("connect"), the image
// fails ("fail"), or the guest never shows up ("silent"). Detach is
// answered in every case.
func fakeXenDaemon(t *testing.T, xs *xenstore.Client, be, mode string) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); <-done })
	go func() {
		defer close(done)
		acted := false
		for ctx.Err() == nil {
			time.Sleep(20 * time.Millisecond)
			if _, err := xs.Read(ctx, be); err != nil {
				continue
			}
			if online, _ := xs.Read(ctx, be+"/online"); online == "0" {
				xs.Write(ctx, be+"/state", "6")
				xs.Write(ctx, be+"/blktap/phase", "closed")
				continue
			}
			if acted {
				continue
			}
			acted = true
			switch mode {
			case "connect":
				xs.Write(ctx, be+"/state", "4")
				xs.Write(ctx, be+"/blktap/phase", "connected")
			case "fail":
				xs.Write(ctx, be+"/blktap/error", "open /img: no such file or directory")
				xs.Write(ctx, be+"/blktap/phase", "failed")
			case "silent":
				xs.Write(ctx, be+"/state", "2")
				xs.Write(ctx, be+"/blktap/phase", "waiting-frontend")
			}
		}
	}()
}

// stdoutOf runs fn with os.Stdout captured.
func stdoutOf(t *testing.T, fn func() error) (string, error) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	old := os.Stdout
	os.Stdout = w
	ferr := fn()
	os.Stdout = old
	w.Close()
	b, _ := io.ReadAll(r)
	r.Close()
	return string(b), ferr
}

// XEN-HOST 5.5: `blktap attach N` on real Xen waits for the guest, prints
// the name the guest sees the disk under, rolls back only on a failure,
// and on a timeout leaves the disk attached and says so.
func TestAttachRealXenGuest(t *testing.T) {
	defer func(p func() reconciler.HostFacts) { reconciler.ProbeHost = p }(reconciler.ProbeHost)
	reconciler.ProbeHost = func() reconciler.HostFacts { return reconciler.HostFacts{Xen: true} }
	dir, err := os.MkdirTemp("", "bt")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "xs.sock")
	srv := xenstore.NewServer(slog.New(slog.DiscardHandler))
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Close()
	xs, err := xenstore.Dial(context.Background(), sock)
	if err != nil {
		t.Fatal(err)
	}
	defer xs.Close()
	img := filepath.Join(dir, "a.raw")
	if err := os.WriteFile(img, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	// attach asks the daemon's API before it writes anything: this one
	// answers that it is there, and serves no disk yet.
	api, err := net.Listen("unix", filepath.Join(dir, reconciler.APISocket))
	if err != nil {
		t.Fatal(err)
	}
	go http.Serve(api, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/ping" {
			io.WriteString(w, `{"pid": 1}`)
			return
		}
		io.WriteString(w, "[]")
	}))
	defer api.Close()
	be := reconciler.Key{Kind: reconciler.KindVBD3, Domid: 3, Devid: 51728}.BackendPath(0)
	attach := func(mode string) (string, error) {
		t.Helper()
		fakeXenDaemon(t, xs, be, mode)
		return stdoutOf(t, func() error {
			return execute([]string{"attach", "--xenstore", sock, "--state-dir", dir, "--timeout", "1s", "3", "aio:" + img, "xvdb", "w"})
		})
	}

	out, err := attach("connect")
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	if lines := strings.Split(strings.TrimSpace(out), "\n"); lines[len(lines)-1] != "xvdb" {
		t.Fatalf("connect printed %q, want the guest's device name last", out)
	}
	xs.Rm(context.Background(), be)

	out, err = attach("silent")
	if err == nil || !strings.Contains(err.Error(), "has not connected it yet") {
		t.Fatalf("silent guest: %v (out %q)", err, out)
	}
	if _, rerr := xs.Read(context.Background(), be); rerr != nil {
		t.Fatalf("a disk the guest has not connected yet was removed: %v", rerr)
	}
	xs.Rm(context.Background(), be)

	if _, err = attach("fail"); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Fatalf("failed image: %v", err)
	}
	if _, rerr := xs.Read(context.Background(), be); rerr == nil {
		t.Fatal("a failed disk was left attached")
	}
}
