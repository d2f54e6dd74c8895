package xenstore

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

// TestReadMany: a batch answers each path as Read does (values, a missing
// key's ENOENT), across more paths than one batch holds, and its reads
// count in the transaction: a key it read that changes before the commit
// makes the transaction run again.
func TestReadMany(t *testing.T) {
	sock, _ := startServer(t)
	c, other := dial(t, sock), dial(t, sock)
	ctx := testCtx(t)
	var paths []string
	for i := range readBatchMax*2 + 3 {
		p := fmt.Sprintf("/m/k%d", i)
		paths = append(paths, p)
		if i%3 == 0 {
			continue // left missing
		}
		if err := c.Write(ctx, p, fmt.Sprint("v", i)); err != nil {
			t.Fatal(err)
		}
	}
	runs := 0
	err := c.Transaction(ctx, func(tx *Tx) error {
		runs++
		vals, errs := tx.ReadMany(ctx, paths)
		if runs == 1 {
			// Only the batch read k1: the commit must see the change.
			return other.Write(ctx, "/m/k1", "changed")
		}
		for i, p := range paths {
			want, werr := tx.Read(ctx, p)
			if vals[i] != want || errors.Is(errs[i], ErrNotFound) != errors.Is(werr, ErrNotFound) || (errs[i] == nil) != (werr == nil) {
				return fmt.Errorf("%s: batch %q %v, Read %q %v", p, vals[i], errs[i], want, werr)
			}
			if i%3 == 0 && !errors.Is(errs[i], ErrNotFound) {
				return fmt.Errorf("%s: want ENOENT, got %q %v", p, vals[i], errs[i])
			}
		}
		if vals[1] != "changed" {
			return fmt.Errorf("second run read %q", vals[1])
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if runs != 2 {
		t.Fatalf("transaction ran %d times, want 2 (the batch's read of a changed key must conflict)", runs)
	}
}

// TestWriteMany: a batch writes every pair, in order (the same key twice:
// the last value stands), across more pairs than one batch holds; the
// first failure is the error, and aborting the transaction keeps every
// write of the batch out.
func TestWriteMany(t *testing.T) {
	sock, _ := startServer(t)
	c := dial(t, sock)
	ctx := testCtx(t)
	var kvs [][2]string
	for i := range readBatchMax + 5 {
		kvs = append(kvs, [2]string{fmt.Sprintf("/w/k%d", i), fmt.Sprint("v", i)})
	}
	kvs = append(kvs, [2]string{"/w/k0", "last"})
	if err := c.Transaction(ctx, func(tx *Tx) error { return tx.WriteMany(ctx, kvs) }); err != nil {
		t.Fatal(err)
	}
	for _, kv := range kvs[1:] {
		if v, err := c.Read(ctx, kv[0]); err != nil || v != kv[1] && kv[0] != "/w/k0" {
			t.Fatalf("%s: %q %v, want %q", kv[0], v, err, kv[1])
		}
	}
	if v, _ := c.Read(ctx, "/w/k0"); v != "last" {
		t.Fatalf("/w/k0 is %q, want the batch's last write", v)
	}
	bad := [][2]string{{"/w/a", "1"}, {"/w/bad//path", "x"}, {"/w/b", "2"}}
	err := c.Transaction(ctx, func(tx *Tx) error { return tx.WriteMany(ctx, bad) })
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "/w/bad//path") {
		t.Fatalf("batch with a bad path: %v, want EINVAL naming it", err)
	}
	for _, p := range []string{"/w/a", "/w/b"} {
		if _, err := c.Read(ctx, p); !errors.Is(err, ErrNotFound) {
			t.Fatalf("%s after the aborted batch: %v, want ENOENT", p, err)
		}
	}
}
