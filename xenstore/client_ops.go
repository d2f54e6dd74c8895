package xenstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v4"
)

// ops is shared by Client (tx 0) and Tx.
type ops struct {
	c  *Client
	tx uint32
}

func (o ops) Read(ctx context.Context, path string) (string, error) {
	b, err := o.c.request(ctx, OpRead, o.tx, joinStrings(path))
	if err != nil {
		return "", fmt.Errorf("read %s: %w", path, err)
	}
	return string(b), nil
}

// readBatchMax bounds one batch of ReadMany, well inside a server's
// queue of replies for one connection.
const readBatchMax = 128

// ReadMany reads every path, sending the requests together so that they
// cost one round trip per readBatchMax paths instead of one each. vals[i]
// and errs[i] are what Read(paths[i]) would return; a failure of the
// connection fails every path it left unread.
func (o ops) ReadMany(ctx context.Context, paths []string) (vals []string, errs []error) {
	vals, errs = make([]string, len(paths)), make([]error, len(paths))
	for lo := 0; lo < len(paths); lo += readBatchMax {
		hi := min(lo+readBatchMax, len(paths))
		payloads := make([][]byte, hi-lo)
		for i, p := range paths[lo:hi] {
			payloads[i] = joinStrings(p)
		}
		rs, err := o.c.requests(ctx, OpRead, o.tx, payloads)
		for i := lo; i < hi; i++ {
			e := err
			if e == nil {
				e = rs[i-lo].err
			}
			if e != nil {
				errs[i] = fmt.Errorf("read %s: %w", paths[i], e)
				continue
			}
			vals[i] = string(rs[i-lo].payload)
		}
	}
	return vals, errs
}

// WriteMany writes every key, value pair in order, sending them together
// as ReadMany sends reads. The server applies each write on its own: in a
// transaction, abort it on an error; outside one, the writes before and
// after the one that failed may have landed. The error is the first one.
func (o ops) WriteMany(ctx context.Context, kvs [][2]string) error {
	for lo := 0; lo < len(kvs); lo += readBatchMax {
		hi := min(lo+readBatchMax, len(kvs))
		payloads := make([][]byte, hi-lo)
		for i, kv := range kvs[lo:hi] {
			payloads[i] = append(append([]byte(kv[0]), 0), kv[1]...)
		}
		rs, err := o.c.requests(ctx, OpWrite, o.tx, payloads)
		if err != nil {
			return fmt.Errorf("write %s: %w", kvs[lo][0], err)
		}
		for i, r := range rs {
			if r.err != nil {
				return fmt.Errorf("write %s: %w", kvs[lo+i][0], r.err)
			}
		}
	}
	return nil
}

func (o ops) Write(ctx context.Context, path, value string) error {
	p := append(append([]byte(path), 0), value...)
	if _, err := o.c.request(ctx, OpWrite, o.tx, p); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func (o ops) Mkdir(ctx context.Context, path string) error {
	if _, err := o.c.request(ctx, OpMkdir, o.tx, joinStrings(path)); err != nil {
		return fmt.Errorf("mkdir %s: %w", path, err)
	}
	return nil
}

func (o ops) Rm(ctx context.Context, path string) error {
	if _, err := o.c.request(ctx, OpRm, o.tx, joinStrings(path)); err != nil {
		return fmt.Errorf("rm %s: %w", path, err)
	}
	return nil
}

func (o ops) Directory(ctx context.Context, path string) ([]string, error) {
	b, err := o.c.request(ctx, OpDirectory, o.tx, joinStrings(path))
	if errors.Is(err, ErrTooBig) {
		// C xenstored refuses listings over 4096 bytes: page through them.
		return o.directoryParts(ctx, path)
	}
	if err != nil {
		return nil, fmt.Errorf("directory %s: %w", path, err)
	}
	if len(b) == 0 {
		return []string{}, nil
	}
	names, ok := splitStrings(b)
	if !ok {
		return nil, fmt.Errorf("directory %s: %w: unterminated reply", path, ErrProtocol)
	}
	return names, nil
}

// directoryParts lists path with DIRECTORY_PART, restarting when the
// node's generation changes between chunks.
func (o ops) directoryParts(ctx context.Context, path string) ([]string, error) {
	var names []string
	gen, off := "", 0
	for chunks := 0; ; chunks++ {
		if chunks > 1<<16 {
			return nil, fmt.Errorf("directory %s: %w: DIRECTORY_PART never ends", path, ErrProtocol)
		}
		b, err := o.c.request(ctx, OpDirectoryPart, o.tx, joinStrings(path, strconv.Itoa(off)))
		if err != nil {
			return nil, fmt.Errorf("directory %s: %w", path, err)
		}
		i := bytes.IndexByte(b, 0)
		if i < 0 {
			return nil, fmt.Errorf("directory %s: %w: DIRECTORY_PART reply %q", path, ErrProtocol, b)
		}
		if g := string(b[:i]); g != gen {
			if gen != "" {
				names, off = nil, 0 // changed under us: start again
				gen = g
				continue
			}
			gen = g
		}
		rest, consumed := b[i+1:], 0
		for {
			j := bytes.IndexByte(rest, 0)
			if j < 0 {
				return nil, fmt.Errorf("directory %s: %w: unterminated DIRECTORY_PART", path, ErrProtocol)
			}
			if j == 0 {
				return names, nil // the empty name ends the list
			}
			names = append(names, string(rest[:j]))
			rest = rest[j+1:]
			consumed += j + 1
			if len(rest) == 0 {
				break
			}
		}
		if consumed == 0 {
			return nil, fmt.Errorf("directory %s: %w: empty DIRECTORY_PART chunk", path, ErrProtocol)
		}
		off += consumed
	}
}

func (o ops) GetPerms(ctx context.Context, path string) ([]Perm, error) {
	b, err := o.c.request(ctx, OpGetPerms, o.tx, joinStrings(path))
	if err != nil {
		return nil, fmt.Errorf("get-perms %s: %w", path, err)
	}
	parts, ok := splitStrings(b)
	if !ok || len(parts) == 0 {
		return nil, fmt.Errorf("get-perms %s: %w: reply %q", path, ErrProtocol, b)
	}
	perms := make([]Perm, len(parts))
	for i, s := range parts {
		if perms[i], err = ParsePerm(s); err != nil {
			return nil, fmt.Errorf("get-perms %s: %w: %w", path, ErrProtocol, err)
		}
	}
	return perms, nil
}

func (o ops) SetPerms(ctx context.Context, path string, perms []Perm) error {
	if len(perms) == 0 {
		return fmt.Errorf("set-perms %s: %w: no permissions", path, ErrInvalid)
	}
	s := []string{path}
	for _, p := range perms {
		s = append(s, p.String())
	}
	if _, err := o.c.request(ctx, OpSetPerms, o.tx, joinStrings(s...)); err != nil {
		return fmt.Errorf("set-perms %s: %w", path, err)
	}
	return nil
}

// Exists reports whether path exists (a READ that is not ENOENT).
func (o ops) Exists(ctx context.Context, path string) (bool, error) {
	_, err := o.Read(ctx, path)
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

// Read returns the value at path.
func (c *Client) Read(ctx context.Context, path string) (string, error) {
	return ops{c: c}.Read(ctx, path)
}

// Write sets the value at path, creating it and missing parents.
func (c *Client) Write(ctx context.Context, path, value string) error {
	return ops{c: c}.Write(ctx, path, value)
}

// Mkdir creates path (and parents) with an empty value; an existing node
// is left as it is.
func (c *Client) Mkdir(ctx context.Context, path string) error { return ops{c: c}.Mkdir(ctx, path) }

// Rm removes path and everything beneath it. Xen's xenstored answers OK
// for a missing node whose parent exists and ENOENT when the parent is
// missing too.
func (c *Client) Rm(ctx context.Context, path string) error { return ops{c: c}.Rm(ctx, path) }

// Directory lists the names of path's children.
func (c *Client) Directory(ctx context.Context, path string) ([]string, error) {
	return ops{c: c}.Directory(ctx, path)
}

// GetPerms returns path's permissions (owner first).
func (c *Client) GetPerms(ctx context.Context, path string) ([]Perm, error) {
	return ops{c: c}.GetPerms(ctx, path)
}

// SetPerms replaces path's permissions; perms[0] is the owner and default.
func (c *Client) SetPerms(ctx context.Context, path string, perms []Perm) error {
	return ops{c: c}.SetPerms(ctx, path, perms)
}

// Exists reports whether path exists.
func (c *Client) Exists(ctx context.Context, path string) (bool, error) {
	return ops{c: c}.Exists(ctx, path)
}

// GetDomainPath asks the server for domid's home (/local/domain/<domid>).
func (c *Client) GetDomainPath(ctx context.Context, domid uint32) (string, error) {
	b, err := c.request(ctx, OpGetDomainPath, 0, joinStrings(strconv.FormatUint(uint64(domid), 10)))
	if err != nil {
		return "", fmt.Errorf("get-domain-path %d: %w", domid, err)
	}
	return strings.TrimRight(string(b), "\x00"), nil
}

// Tx is an open transaction; its methods act inside it and see its own
// writes. Only valid during the function given to Client.Transaction.
type Tx struct{ o ops }

// Read returns the value at path as the transaction sees it.
func (t *Tx) Read(ctx context.Context, path string) (string, error) { return t.o.Read(ctx, path) }

// WriteMany writes every pair in the transaction in one round trip.
func (t *Tx) WriteMany(ctx context.Context, kvs [][2]string) error { return t.o.WriteMany(ctx, kvs) }

// ReadMany reads every path in the transaction in one round trip.
func (t *Tx) ReadMany(ctx context.Context, paths []string) ([]string, []error) {
	return t.o.ReadMany(ctx, paths)
}

// Write sets path's value inside the transaction.
func (t *Tx) Write(ctx context.Context, path, value string) error {
	return t.o.Write(ctx, path, value)
}

// Mkdir creates path inside the transaction.
func (t *Tx) Mkdir(ctx context.Context, path string) error { return t.o.Mkdir(ctx, path) }

// Rm removes path inside the transaction.
func (t *Tx) Rm(ctx context.Context, path string) error { return t.o.Rm(ctx, path) }

// Directory lists path's children as the transaction sees them.
func (t *Tx) Directory(ctx context.Context, path string) ([]string, error) {
	return t.o.Directory(ctx, path)
}

// GetPerms returns path's permissions as the transaction sees them.
func (t *Tx) GetPerms(ctx context.Context, path string) ([]Perm, error) {
	return t.o.GetPerms(ctx, path)
}

// SetPerms replaces path's permissions inside the transaction.
func (t *Tx) SetPerms(ctx context.Context, path string, perms []Perm) error {
	return t.o.SetPerms(ctx, path, perms)
}

// Exists reports whether path exists as the transaction sees it.
func (t *Tx) Exists(ctx context.Context, path string) (bool, error) { return t.o.Exists(ctx, path) }

// MaxTxAttempts bounds how often Transaction runs fn when commits keep
// conflicting.
const MaxTxAttempts = 16

// Transaction runs fn inside a transaction and commits it. When the
// commit conflicts (EAGAIN) the whole of fn runs again in a new
// transaction, with backoff, at most MaxTxAttempts times. An error from fn
// aborts the transaction and is returned (fn returning an ErrAgain error
// also retries). fn must have no effects outside tx, as it may run more
// than once.
func (c *Client) Transaction(ctx context.Context, fn func(tx *Tx) error) error {
	// The first retry comes soon (a lone conflict is the common case)
	// and the wait doubles, with jitter, so that many clients conflicting
	// on one node spread out instead of colliding again in step. Options,
	// not fields set afterwards: the constructor starts the current
	// interval from the defaults (500 ms) before fields could be set.
	b := backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(2*time.Millisecond),
		backoff.WithMultiplier(2),
		backoff.WithMaxInterval(250*time.Millisecond),
		backoff.WithMaxElapsedTime(0),
	)
	var last error
	for attempt := 0; attempt < MaxTxAttempts; attempt++ {
		if attempt > 0 {
			select {
			case <-time.After(b.NextBackOff()):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		r, err := c.request(ctx, OpTransactionStart, 0, joinStrings(""))
		if err != nil {
			return fmt.Errorf("transaction start: %w", err)
		}
		id, perr := strconv.ParseUint(strings.TrimRight(string(r), "\x00"), 10, 32)
		if perr != nil || id == 0 {
			return fmt.Errorf("transaction start: %w: id %q", ErrProtocol, r)
		}
		tx := &Tx{ops{c: c, tx: uint32(id)}}
		txid := uint32(id)
		if err := fn(tx); err != nil {
			// Abort, even if ctx is what failed fn, but never wait long:
			// its own failure matters less than fn's error.
			actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			_, _ = c.request(actx, OpTransactionEnd, txid, joinStrings("F"))
			cancel()
			if errors.Is(err, ErrAgain) {
				last = err
				continue
			}
			return err
		}
		_, err = c.request(ctx, OpTransactionEnd, txid, joinStrings("T"))
		if err == nil {
			return nil
		}
		if !errors.Is(err, ErrAgain) {
			return fmt.Errorf("transaction commit: %w", err)
		}
		last = err
	}
	return fmt.Errorf("transaction: gave up after %d conflicts: %w", MaxTxAttempts, last)
}
