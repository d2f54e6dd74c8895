package xenstore

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"
)

func TestSocketModeAndStale(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "s")
	// A stale socket left by a dead server is replaced.
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	srv := NewServer(nil)
	errc := make(chan error, 1)
	go func() { errc <- srv.ListenAndServe(sock) }()
	waitSocket(t, sock)
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, want 0600", fi.Mode().Perm())
	}
	// A live one is not stolen.
	if err := NewServer(nil).ListenAndServe(sock); err == nil {
		t.Fatal("second server took a live socket")
	}
	// A regular file is not removed.
	file := filepath.Join(dir, "f")
	os.WriteFile(file, nil, 0o644)
	if err := NewServer(nil).ListenAndServe(file); err == nil {
		t.Fatal("listened over a regular file")
	}
	srv.Close()
	if err := <-errc; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("ListenAndServe: %v", err)
	}
}

// TestOversizeDropsOnlyThatConnection: a header announcing more than
// 4096 bytes closes that connection; others carry on.
func TestOversizeDropsOnlyThatConnection(t *testing.T) {
	sock, good, ctx := served(t)
	if err := good.Write(ctx, "/o", "1"); err != nil {
		t.Fatal(err)
	}
	bad, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	var h [HeaderSize]byte
	binary.LittleEndian.PutUint32(h[0:], uint32(OpWrite))
	binary.LittleEndian.PutUint32(h[12:], PayloadMax+1)
	bad.Write(h[:])
	buf := make([]byte, 64)
	if n, err := bad.Read(buf); err == nil {
		t.Fatalf("server answered %q instead of closing", buf[:n])
	}
	if v, err := good.Read(ctx, "/o"); err != nil || v != "1" {
		t.Fatalf("other connection: %q %v", v, err)
	}
}

// TestStress: 32 clients write, run transactions and watch at once. Every
// write must be seen by a watcher of its path at least once, and nothing
// may deadlock (run under -race).
func TestStress(t *testing.T) {
	sock, _ := startServer(t)
	ctx := testCtx(t)
	const clients, writes = 32, 30
	watcher := dial(t, sock)
	w, err := watcher.Watch(ctx, "/stress", "all")
	if err != nil {
		t.Fatal(err)
	}
	recv(t, ctx, w)
	col := collect(w)
	eachClient(t, sock, clients, func(i int, c *Client) error {
		return stressClient(ctx, i, c, writes)
	})
	// Fence: the watcher's events arrive in order, so once this one is
	// seen every earlier one has been delivered (or collapsed).
	if err := watcher.Write(ctx, "/stress/fence", "x"); err != nil {
		t.Fatal(err)
	}
	for !col.saw("/stress/fence") {
		select {
		case <-ctx.Done():
			t.Fatal("fence event never arrived")
		default:
			watcher.Read(ctx, "/stress/fence") // yield to the collector
		}
	}
	col.stop()
	for i := 0; i < clients; i++ {
		var names []string
		if col.overflowed {
			// Level-triggered: after an Overflow the consumer re-reads.
			if names, err = watcher.Directory(ctx, fmt.Sprintf("/stress/%d", i)); err != nil {
				t.Fatal(err)
			}
		}
		for j := 0; j < writes; j++ {
			p := fmt.Sprintf("/stress/%d/%d", i, j)
			if !col.seen[p] && !slices.Contains(names, fmt.Sprint(j)) {
				t.Fatalf("write of %s never reported (overflow: %v)", p, col.overflowed)
			}
		}
	}
}

// collector records the paths a watch reports, and whether it overflowed.
type collector struct {
	mu         sync.Mutex
	seen       map[string]bool
	overflowed bool
	halt, done chan struct{}
}

func collect(w *Watch) *collector {
	c := &collector{seen: map[string]bool{}, halt: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(c.done)
		for {
			select {
			case ev := <-w.Events():
				c.mu.Lock()
				if ev.Overflow {
					c.overflowed = true
				}
				c.seen[ev.Path] = true
				c.mu.Unlock()
			case <-c.halt:
				return
			}
		}
	}()
	return c
}

func (c *collector) saw(path string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.seen[path]
}

// stop ends the collection; seen and overflowed are then final.
func (c *collector) stop() {
	close(c.halt)
	<-c.done
}

// stressClient watches its own subtree and writes writes nodes under it,
// every third in a transaction that also rewrites a shared node.
func stressClient(ctx context.Context, i int, c *Client, writes int) error {
	own, err := c.Watch(ctx, fmt.Sprintf("/stress/%d", i), "own")
	if err != nil {
		return err
	}
	defer own.Close()
	go func() {
		for range own.Events() {
		}
	}()
	for j := 0; j < writes; j++ {
		p := fmt.Sprintf("/stress/%d/%d", i, j)
		if j%3 == 0 {
			err = c.Transaction(ctx, func(tx *Tx) error {
				if _, err := tx.Read(ctx, "/stress/shared"); err != nil && !errors.Is(err, ErrNotFound) {
					return err
				}
				if err := tx.Write(ctx, "/stress/shared", p); err != nil {
					return err
				}
				return tx.Write(ctx, p, "tx")
			})
		} else {
			err = c.Write(ctx, p, "w")
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// TestFileConn: the xenbus device path (a *os.File, no deadlines) works
// as a client transport; a socketpair stands in for the device.
func TestFileConn(t *testing.T) {
	_, srv := startServer(t)
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	serverEnd, err := net.FileConn(os.NewFile(uintptr(fds[1]), "srv"))
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.serveConn(serverEnd, 0); err != nil {
		t.Fatal(err)
	}
	// Non-blocking, so os.File uses the poller and Close interrupts a
	// pending Read, as it does for the real (pollable) device.
	if err := syscall.SetNonblock(fds[0], true); err != nil {
		t.Fatal(err)
	}
	c := NewClient(fileConn{os.NewFile(uintptr(fds[0]), "xenbus")})
	defer c.Close()
	ctx := testCtx(t)
	if err := c.Write(ctx, "/fc", "1"); err != nil {
		t.Fatal(err)
	}
	if v, err := c.Read(ctx, "/fc"); err != nil || v != "1" {
		t.Fatalf("%q %v", v, err)
	}
}

// TestDomainSocketQuotas: a per-domain socket applies the guest's
// watch and transaction limits.
func TestDomainSocketQuotas(t *testing.T) {
	_, srv := startServer(t)
	sock := filepath.Join(t.TempDir(), "dom7")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.ServeDomain(ln, 7)
	srv.Do(func(st *State) { st.Quota.Watches, st.Quota.Transactions = 2, 1 })
	g := dial(t, sock)
	ctx := testCtx(t)
	for i := 0; i < 2; i++ {
		if _, err := g.Watch(ctx, fmt.Sprintf("w%d", i), "t"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := g.Watch(ctx, "w2", "t"); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("third watch: %v", err)
	}
	// One transaction may be open; a second is refused.
	err = g.Transaction(ctx, func(tx *Tx) error {
		return g.Transaction(ctx, func(*Tx) error { return nil })
	})
	if !errors.Is(err, ErrNoSpace) {
		t.Fatalf("second transaction: %v", err)
	}
	if _, err := g.Read(ctx, "/tool"); !errors.Is(err, ErrAccess) {
		t.Fatalf("guest read of /tool: %v", err)
	}
}
