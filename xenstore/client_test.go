package xenstore

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/parallel"
)

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func dial(t testing.TB, sock string, opts ...Option) *Client {
	t.Helper()
	c, err := Dial(testCtx(t), sock, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// served starts a server and dials it: its socket, a client closed when
// the test ends, and the test's context.
func served(t testing.TB) (string, *Client, context.Context) {
	t.Helper()
	sock, _ := startServer(t)
	return sock, dial(t, sock), testCtx(t)
}

// eachClient dials n clients to sock and runs fn on each at once, the
// client's index with it; the test fails on any fn's error.
func eachClient(t *testing.T, sock string, n int, fn func(i int, c *Client) error) {
	t.Helper()
	cs := make([]*Client, n)
	for i := range cs {
		cs[i] = dial(t, sock)
	}
	parallel.Run(t, n, func(i int) error { return fn(i, cs[i]) })
}

func TestClientBasics(t *testing.T) {
	_, c, ctx := served(t)
	if err := c.Write(ctx, "/b/x", "1"); err != nil {
		t.Fatal(err)
	}
	if v, err := c.Read(ctx, "/b/x"); err != nil || v != "1" {
		t.Fatalf("read %q %v", v, err)
	}
	_, err := c.Read(ctx, "/b/nope")
	if !errors.Is(err, ErrNotFound) || !errors.Is(err, syscall.ENOENT) {
		t.Fatalf("missing read: %v", err)
	}
	if err := c.Mkdir(ctx, "/b/dir/sub"); err != nil {
		t.Fatal(err)
	}
	names, err := c.Directory(ctx, "/b")
	if err != nil || !slices.Equal(names, []string{"dir", "x"}) {
		t.Fatalf("directory %q %v", names, err)
	}
	if names, err := c.Directory(ctx, "/b/x"); err != nil || len(names) != 0 {
		t.Fatalf("leaf directory %q %v", names, err)
	}
	want := []Perm{{0, PermNone}, {4, PermRead}, {5, PermBoth}}
	if err := c.SetPerms(ctx, "/b/x", want); err != nil {
		t.Fatal(err)
	}
	if got, err := c.GetPerms(ctx, "/b/x"); err != nil || !slices.Equal(got, want) {
		t.Fatalf("perms %v %v", got, err)
	}
	if err := c.SetPerms(ctx, "/b/x", nil); !errors.Is(err, ErrInvalid) {
		t.Fatalf("empty perms: %v", err)
	}
	if ok, err := c.Exists(ctx, "/b/dir"); !ok || err != nil {
		t.Fatalf("exists %v %v", ok, err)
	}
	if err := c.Rm(ctx, "/b/dir"); err != nil {
		t.Fatal(err)
	}
	if ok, err := c.Exists(ctx, "/b/dir/sub"); ok || err != nil {
		t.Fatalf("exists after rm %v %v", ok, err)
	}
	if err := c.Write(ctx, "/b/bad/", "1"); !errors.Is(err, ErrInvalid) {
		t.Fatalf("bad path: %v", err)
	}
	if p, err := c.GetDomainPath(ctx, 3); err != nil || p != "/local/domain/3" {
		t.Fatalf("domain path %q %v", p, err)
	}
	big := make([]byte, PayloadMax)
	if err := c.Write(ctx, "/b/big", string(big)); !errors.Is(err, ErrPayloadTooBig) {
		t.Fatalf("oversize write: %v", err)
	}
	// The connection survives a refused oversize request.
	if _, err := c.Read(ctx, "/b/x"); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if _, err := c.Read(ctx, "/b/x"); !errors.Is(err, ErrClosed) {
		t.Fatalf("after close: %v", err)
	}
}

func TestClientBigDirectory(t *testing.T) {
	sock, _ := startServer(t)
	checkBigDirectory(t, dial(t, sock))
}

func TestClientConcurrent(t *testing.T) {
	_, c, ctx := served(t)
	var wg sync.WaitGroup
	errc := make(chan error, 64)
	for g := 0; g < 32; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 40; i++ {
				p := fmt.Sprintf("/conc/%d/%d", g, i)
				v := fmt.Sprintf("v%d-%d", g, i)
				if err := c.Write(ctx, p, v); err != nil {
					errc <- err
					return
				}
				got, err := c.Read(ctx, p)
				if err != nil || got != v {
					errc <- fmt.Errorf("read %s = %q, %v", p, got, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	names, err := c.Directory(ctx, "/conc")
	if err != nil || len(names) != 32 {
		t.Fatalf("directory: %d names, %v", len(names), err)
	}
}

func TestTransactionRetriesOnConflict(t *testing.T) {
	sock, _ := startServer(t)
	c := dial(t, sock)
	other := dial(t, sock)
	ctx := testCtx(t)
	if err := c.Write(ctx, "/tx/n", "0"); err != nil {
		t.Fatal(err)
	}
	runs, err := raceTx(ctx, c, other, "/tx/n", "10", "+1")
	if err != nil {
		t.Fatal(err)
	}
	if runs != 2 {
		t.Fatalf("fn ran %d times, want 2", runs)
	}
	if v, _ := c.Read(ctx, "/tx/n"); v != "10+1" {
		t.Fatalf("value %q", v)
	}
	// An error from fn aborts and is returned as is.
	boom := errors.New("boom")
	err = c.Transaction(ctx, func(tx *Tx) error {
		if err := tx.Write(ctx, "/tx/n", "aborted"); err != nil {
			return err
		}
		return boom
	})
	if err != boom {
		t.Fatalf("abort: %v", err)
	}
	if v, _ := c.Read(ctx, "/tx/n"); v != "10+1" {
		t.Fatalf("aborted write leaked: %q", v)
	}
}

// TestTransactionCounter: concurrent read-modify-write transactions from
// several clients lose no increment.
func TestTransactionCounter(t *testing.T) {
	sock, _ := startServer(t)
	ctx := testCtx(t)
	const clients, incs = 4, 15
	var conflicts atomic.Int32
	eachClient(t, sock, clients, func(_ int, c *Client) error {
		for j := 0; j < incs; j++ {
			first := true
			err := c.Transaction(ctx, func(tx *Tx) error {
				if !first {
					conflicts.Add(1)
				}
				first = false
				v, err := tx.Read(ctx, "/counter")
				if errors.Is(err, ErrNotFound) {
					v, err = "0", nil
				}
				if err != nil {
					return err
				}
				var n int
				fmt.Sscan(v, &n)
				return tx.Write(ctx, "/counter", fmt.Sprint(n+1))
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	c := dial(t, sock)
	if v, err := c.Read(ctx, "/counter"); err != nil || v != fmt.Sprint(clients*incs) {
		t.Fatalf("counter %q %v", v, err)
	}
	t.Logf("%d conflicts retried", conflicts.Load())
}

func TestWatchEvents(t *testing.T) {
	_, c, ctx := served(t)
	w, err := c.Watch(ctx, "/we", "tok")
	if err != nil {
		t.Fatal(err)
	}
	next := func() Event { t.Helper(); return recv(t, ctx, w) }
	if ev := next(); ev != (Event{Path: "/we", Token: "tok"}) {
		t.Fatalf("initial event %+v", ev)
	}
	if err := c.Write(ctx, "/we/a", "1"); err != nil {
		t.Fatal(err)
	}
	if ev := next(); ev.Path != "/we/a" {
		t.Fatalf("event %+v", ev)
	}
	if _, err := c.Watch(ctx, "/we", "tok"); !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate watch: %v", err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	for range w.Events() {
	}
	// Unregistered on the server too: the same watch can be set again.
	w2, err := c.Watch(ctx, "/we", "tok")
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	for range w2.Events() {
	}
}

// TestWatchOverflow: a consumer that does not read never blocks the
// client; it gets one Overflow event instead of the backlog.
func TestWatchOverflow(t *testing.T) {
	_, c, ctx := served(t)
	slow, err := c.Watch(ctx, "/ov", "slow")
	if err != nil {
		t.Fatal(err)
	}
	fence, err := c.Watch(ctx, "/fence", "fence")
	if err != nil {
		t.Fatal(err)
	}
	recv(t, ctx, fence)
	n := WatchQueueLen * 2
	for i := 0; i < n; i++ {
		// Calls keep working while slow's queue is full.
		if err := c.Write(ctx, fmt.Sprintf("/ov/%d", i), "x"); err != nil {
			t.Fatal(err)
		}
	}
	// The reader handles messages in order: once the fence's event is
	// out, every /ov event has been queued (or collapsed).
	if err := c.Write(ctx, "/fence", "x"); err != nil {
		t.Fatal(err)
	}
	recv(t, ctx, fence)
	got := 0
	for ev := recv(t, ctx, slow); !ev.Overflow; ev = recv(t, ctx, slow) {
		got++
	}
	got++
	// Room again: a new event is delivered normally, after what is left.
	if err := c.Write(ctx, "/ov/last", "x"); err != nil {
		t.Fatal(err)
	}
	for ev := recv(t, ctx, slow); ev.Path != "/ov/last"; ev = recv(t, ctx, slow) {
		got++
	}
	got++
	if got > WatchQueueLen+2 {
		t.Fatalf("%d events delivered for %d writes: backlog not collapsed", got, n+1)
	}
}

func TestConnLostAndReconnect(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "s")
	srv := NewServer(nil)
	go srv.ListenAndServe(sock)
	waitSocket(t, sock)
	ctx := testCtx(t)
	plain := dial(t, sock)
	c := dial(t, sock, WithReconnect())
	w, err := c.Watch(ctx, "/r", "tok")
	if err != nil {
		t.Fatal(err)
	}
	recv(t, ctx, w)
	srv.Close()
	// Without reconnect the client is done, with a clear error.
	for {
		_, err := plain.Read(ctx, "/r")
		if errors.Is(err, ErrConnLost) || errors.Is(err, ErrClosed) {
			break
		}
		if err == nil || errors.Is(err, ErrNotFound) {
			continue // the close has not reached the client yet
		}
		t.Fatalf("plain client after server close: %v", err)
	}
	srv2 := NewServer(nil)
	go srv2.ListenAndServe(sock)
	t.Cleanup(func() { srv2.Close() })
	// The re-registered watch reports an Overflow (re-read everything),
	// then the new server's initial event for it, then real events.
	for !recv(t, ctx, w).Overflow {
	}
	if err := c.Write(ctx, "/r/after", "1"); err != nil {
		t.Fatal(err)
	}
	for recv(t, ctx, w).Path != "/r/after" {
	}
}

// raceTx runs a transaction on c that appends suffix to the value at
// path, while other writes theirs there during its first run: the commit
// must fail and the transaction run again on the new value. It returns
// how many runs it took.
func raceTx(ctx context.Context, c, other *Client, path, theirs, suffix string) (int, error) {
	runs := 0
	err := c.Transaction(ctx, func(tx *Tx) error {
		runs++
		v, err := tx.Read(ctx, path)
		if err != nil {
			return err
		}
		if runs == 1 {
			if err := other.Write(ctx, path, theirs); err != nil {
				return err
			}
		}
		return tx.Write(ctx, path, v+suffix)
	})
	return runs, err
}

// recv returns w's next event, failing the test if none comes before
// ctx ends (a hang guard, not a timing assertion).
func recv(t *testing.T, ctx context.Context, w *Watch) Event {
	t.Helper()
	select {
	case ev, ok := <-w.Events():
		if !ok {
			t.Fatal("events channel closed")
		}
		return ev
	case <-ctx.Done():
		t.Fatal("no event before the test deadline")
	}
	return Event{}
}

func waitSocket(t *testing.T, sock string) {
	t.Helper()
	for i := 0; i < 2000; i++ {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("%s never came up", sock)
}

func TestClientContextCancel(t *testing.T) {
	// A peer that never answers.
	a, b := net.Pipe()
	defer b.Close()
	go func() {
		buf := make([]byte, 1024)
		for {
			if _, err := b.Read(buf); err != nil {
				return
			}
		}
	}()
	c := NewClient(a)
	defer c.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { _, err := c.Read(ctx, "/x"); done <- err }()
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v", err)
	}
}

func TestDefaultPath(t *testing.T) {
	t.Setenv("XENSTORED_PATH", "/some/where")
	if p := DefaultPath(); p != "/some/where" {
		t.Fatalf("DefaultPath = %q", p)
	}
	os.Unsetenv("XENSTORED_PATH")
	if p := DefaultPath(); p != "/run/xenstored/socket" && p != "/var/run/xenstored/socket" {
		t.Fatalf("DefaultPath = %q", p)
	}
}

func TestDomainConnection(t *testing.T) {
	_, srv := startServer(t)
	ctx := testCtx(t)
	conn, err := srv.ConnectDomain(5)
	if err != nil {
		t.Fatal(err)
	}
	g := NewClient(conn)
	defer g.Close()
	// Nothing is readable to a guest by default.
	if _, err := g.Read(ctx, "/tool"); !errors.Is(err, ErrAccess) {
		t.Fatalf("guest read: %v", err)
	}
	d0conn, _ := srv.ConnectDomain(0)
	d0 := NewClient(d0conn)
	defer d0.Close()
	if err := d0.Mkdir(ctx, "/local/domain/5"); err != nil {
		t.Fatal(err)
	}
	if err := d0.SetPerms(ctx, "/local/domain/5", []Perm{{5, PermNone}}); err != nil {
		t.Fatal(err)
	}
	if err := g.Write(ctx, "device/vbd/768/state", "1"); err != nil {
		t.Fatal(err)
	}
	if v, err := d0.Read(ctx, "/local/domain/5/device/vbd/768/state"); err != nil || v != "1" {
		t.Fatalf("dom0 view %q %v", v, err)
	}
}
