package xenstore

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// serveWith starts srv on a socket in dir and returns a client.
func serveWith(t *testing.T, srv *Server, dir string) *Client {
	t.Helper()
	ln, err := net.Listen("unix", filepath.Join(dir, "s"))
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	c, err := Dial(testCtx(t), filepath.Join(dir, "s"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// A tree saved by one server is the next server's: values (binary
// included), empty nodes and permissions.
func TestPersistAcrossRestart(t *testing.T) {
	dir := t.TempDir()
	db := filepath.Join(dir, "xenstored.db")
	ctx := testCtx(t)

	srv := NewServer(nil)
	if ok, err := srv.LoadTree(db); ok || err != nil {
		t.Fatalf("LoadTree of a missing file: %v %v", ok, err)
	}
	srv.PersistTo(db, 20*time.Millisecond)
	c := serveWith(t, srv, dir)
	bin := "a\x00b\xffc"
	for _, kv := range [][2]string{
		{"/local/domain/0/backend/vbd3/1/51712/params", "raw:/img/a.raw"},
		{"/local/domain/1/device/vbd/51712/state", "4"},
		{"/bin", bin},
	} {
		if err := c.Write(ctx, kv[0], kv[1]); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Mkdir(ctx, "/empty"); err != nil {
		t.Fatal(err)
	}
	perms := []Perm{{Domid: 1, Access: PermNone}, {Domid: 0, Access: PermRead}}
	if err := c.SetPerms(ctx, "/local/domain/1/device/vbd/51712", perms); err != nil {
		t.Fatal(err)
	}
	waitSaved(t, db)
	if err := c.Write(ctx, "/last", "x"); err != nil {
		t.Fatal(err)
	}
	srv.Close() // saves the last change at once
	if fi, err := os.Stat(db); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("saved tree: %v %v, want mode 0600", fi, err)
	}

	srv2 := NewServer(nil)
	if ok, err := srv2.LoadTree(db); !ok || err != nil {
		t.Fatalf("LoadTree: %v %v", ok, err)
	}
	dir2 := t.TempDir()
	c2 := serveWith(t, srv2, dir2)
	defer srv2.Close()
	for _, kv := range [][2]string{
		{"/local/domain/0/backend/vbd3/1/51712/params", "raw:/img/a.raw"},
		{"/local/domain/1/device/vbd/51712/state", "4"},
		{"/bin", bin},
		{"/empty", ""},
		{"/last", "x"},
	} {
		if v, err := c2.Read(ctx, kv[0]); err != nil || v != kv[1] {
			t.Errorf("%s = %q, %v; want %q", kv[0], v, err, kv[1])
		}
	}
	if got, err := c2.GetPerms(ctx, "/local/domain/1/device/vbd/51712"); err != nil || !slices.Equal(got, perms) {
		t.Errorf("perms %v, %v; want %v", got, err, perms)
	}
	if got, err := c2.GetPerms(ctx, "/"); err != nil || !slices.Equal(got, []Perm{{Domid: 0, Access: PermNone}}) {
		t.Errorf("root perms %v, %v", got, err)
	}
	loadedNodeConflicts(t, ctx, c2)
}

// waitSaved: the tree is saved after the delay, with no Close: what a
// SIGKILL leaves.
func waitSaved(t *testing.T, db string) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, _ := os.ReadFile(db)
		if bytes.Contains(b, []byte(`"/empty"`)) && bytes.Contains(b, []byte(`"b1"`)) || bytes.Contains(b, []byte(`"n1"`)) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("tree not saved within 5s:\n%s", b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// loadedNodeConflicts: loaded nodes exist for transactions: a tx that
// read one conflicts with its removal.
func loadedNodeConflicts(t *testing.T, ctx context.Context, c2 *Client) {
	attempts := 0
	err := c2.Transaction(ctx, func(tx *Tx) error {
		attempts++
		if _, err := tx.Read(ctx, "/last"); err != nil && attempts == 1 {
			return err
		}
		if attempts == 1 {
			if err := c2.Rm(ctx, "/last"); err != nil {
				return err
			}
		}
		return tx.Write(ctx, "/other", "y")
	})
	if err != nil || attempts != 2 {
		t.Errorf("transaction over a removed loaded node: %v after %d attempts; want a retry (EAGAIN)", err, attempts)
	}
}

// A crash in the middle of a save leaves a temporary file beside the
// tree, never a torn tree; a damaged file is refused and changes nothing.
func TestPersistCrashAndDamage(t *testing.T) {
	dir := t.TempDir()
	db := filepath.Join(dir, "xenstored.db")
	srv := NewServer(nil)
	srv.PersistTo(db, time.Hour)
	c := serveWith(t, srv, dir)
	if err := c.Write(testCtx(t), "/kept", "1"); err != nil {
		t.Fatal(err)
	}
	srv.Close()
	// The half-written temporary file of an interrupted save.
	os.WriteFile(filepath.Join(dir, ".xenstored.db.tmp-123"), []byte(`{"format":"blktap-xen`), 0o600)
	srv2 := NewServer(nil)
	if ok, err := srv2.LoadTree(db); !ok || err != nil {
		t.Fatalf("LoadTree next to a torn temporary file: %v %v", ok, err)
	}
	srv2.Do(func(st *State) {
		if n := lookup(st.root, "/kept"); n == nil || string(n.value) != "1" {
			t.Error("/kept lost")
		}
	})
	srv2.PersistTo(db, time.Hour)
	if _, err := os.Stat(filepath.Join(dir, ".xenstored.db.tmp-123")); err == nil {
		t.Error("the torn temporary file is still there")
	}
	srv2.Close()

	for name, data := range map[string]string{
		"truncated":      `{"format":"blktap-xenstored-tree","version":1,"nodes":[{"path":"/"`,
		"other format":   `{"format":"something","version":1,"nodes":[]}`,
		"orphan":         `{"format":"blktap-xenstored-tree","version":1,"nodes":[{"path":"/","perms":["n0"]},{"path":"/a/b","perms":["n0"]}]}`,
		"bad perm":       `{"format":"blktap-xenstored-tree","version":1,"nodes":[{"path":"/","perms":["x0"]}]}`,
		"no perms":       `{"format":"blktap-xenstored-tree","version":1,"nodes":[{"path":"/","perms":[]}]}`,
		"bad path":       `{"format":"blktap-xenstored-tree","version":1,"nodes":[{"path":"/","perms":["n0"]},{"path":"/a//b","perms":["n0"]}]}`,
		"duplicate":      `{"format":"blktap-xenstored-tree","version":1,"nodes":[{"path":"/","perms":["n0"]},{"path":"/a","perms":["n0"]},{"path":"/a","perms":["n0"]}]}`,
		"root not first": `{"format":"blktap-xenstored-tree","version":1,"nodes":[{"path":"/a","perms":["n0"]}]}`,
	} {
		bad := filepath.Join(dir, "bad.db")
		os.WriteFile(bad, []byte(data), 0o600)
		s := NewServer(nil)
		if ok, err := s.LoadTree(bad); ok || err == nil {
			t.Errorf("%s: loaded", name)
		}
		s.Do(func(st *State) {
			if lookup(st.root, "/tool/xenstored") == nil {
				t.Errorf("%s: the fresh tree was changed", name)
			}
		})
	}
}
