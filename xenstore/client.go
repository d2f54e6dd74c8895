package xenstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
)

// DefaultPath is where a xenstored listens: $XENSTORED_PATH if set, else
// the first of /run/xenstored/socket and /var/run/xenstored/socket that
// exists (the first when neither does).
func DefaultPath() string {
	if p := os.Getenv("XENSTORED_PATH"); p != "" {
		return p
	}
	for _, p := range []string{"/run/xenstored/socket", "/var/run/xenstored/socket"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return "/run/xenstored/socket"
}

// WatchQueueLen is how many events a Watch holds for a slow consumer
// before it collapses them into one Overflow event.
const WatchQueueLen = 256

// Option configures a Client.
type Option func(*Client)

// WithReconnect makes the Client redial after the connection drops, with
// backoff, and re-register its watches; every re-registered watch then
// delivers an Overflow event so its consumer re-reads. Calls pending when
// the connection dropped still fail with ErrConnLost, as do open
// transactions.
func WithReconnect() Option { return func(c *Client) { c.reconnect = true } }

// WithLogger sets the client's logger.
func WithLogger(l *slog.Logger) Option { return func(c *Client) { c.log = l } }

// WithDialer replaces how the client (re)connects; the default dials the
// unix socket given to Dial.
func WithDialer(d func(ctx context.Context) (net.Conn, error)) Option {
	return func(c *Client) { c.dial = d }
}

// Client talks to a xenstored. It is safe for concurrent use: requests are
// multiplexed on one connection by req_id.
type Client struct {
	log       *slog.Logger
	dial      func(ctx context.Context) (net.Conn, error)
	reconnect bool
	nextReq   atomic.Uint32

	mu struct {
		sync.Mutex
		conn    net.Conn // nil while reconnecting
		gen     uint64   // connection generation
		pending map[uint32]*call
		watches map[*Watch]struct{}
		closed  bool
		ready   chan struct{} // closed when conn is set again
	}
	wmu  sync.Mutex // serialises writes to conn
	done chan struct{}
	wg   sync.WaitGroup
}

type call struct {
	gen   uint64
	reply chan Message
	err   error // set before reply is closed on failure
}

// Dial connects to the xenstored listening on the unix socket path.
func Dial(ctx context.Context, path string, opts ...Option) (*Client, error) {
	c := &Client{log: slog.New(slog.DiscardHandler), done: make(chan struct{})}
	c.dial = func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}
	for _, o := range opts {
		o(c)
	}
	conn, err := c.dial(ctx)
	if err != nil {
		return nil, fmt.Errorf("xenstore: dial %s: %w", path, err)
	}
	return newClient(c, conn), nil
}

// NewClient wraps an established connection (for example one returned
// by Server.ConnectDomain).
func NewClient(conn net.Conn, opts ...Option) *Client {
	c := &Client{log: slog.New(slog.DiscardHandler), done: make(chan struct{})}
	c.dial = func(context.Context) (net.Conn, error) { return nil, errors.New("xenstore: no dialer") }
	for _, o := range opts {
		o(c)
	}
	return newClient(c, conn)
}

func newClient(c *Client, conn net.Conn) *Client {
	c.mu.pending = map[uint32]*call{}
	c.mu.watches = map[*Watch]struct{}{}
	c.mu.conn = conn
	c.mu.gen = 1
	c.mu.ready = make(chan struct{})
	close(c.mu.ready)
	c.wg.Add(1)
	go c.readLoop(conn, 1)
	return c
}

// Close closes the connection. Pending calls fail with ErrClosed and
// every Watch's channel is closed.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.mu.closed {
		c.mu.Unlock()
		return nil
	}
	c.mu.closed = true
	close(c.done)
	conn := c.mu.conn
	c.failPendingLocked(ErrClosed, 0)
	ws := c.mu.watches
	c.mu.watches = map[*Watch]struct{}{}
	c.mu.Unlock()
	if conn != nil {
		conn.Close()
	}
	for w := range ws {
		w.stop()
	}
	c.wg.Wait()
	return nil
}

// failPendingLocked fails every call of connection generation gen (0 = all).
func (c *Client) failPendingLocked(err error, gen uint64) {
	for id, p := range c.mu.pending {
		if gen == 0 || p.gen == gen {
			p.err = err
			close(p.reply)
			delete(c.mu.pending, id)
		}
	}
}

// clientPayloadMax caps what the client accepts from a server: above
// PayloadMax for oxenstored's oversized DIRECTORY replies, but bounded.
const clientPayloadMax = 1 << 20

func (c *Client) readLoop(conn net.Conn, gen uint64) {
	defer c.wg.Done()
	dec := Decoder{Max: clientPayloadMax}
	buf := make([]byte, 64*1024)
	var rerr error
	for rerr == nil {
		n, err := conn.Read(buf)
		dec.Feed(buf[:n])
		for {
			m, ok, derr := dec.Next()
			if derr != nil {
				rerr = fmt.Errorf("%w: %w", ErrProtocol, derr)
				break
			}
			if !ok {
				break
			}
			c.deliver(m)
		}
		if err != nil && rerr == nil {
			rerr = err
		}
	}
	conn.Close()
	c.mu.Lock()
	if c.mu.closed {
		c.mu.Unlock()
		return
	}
	c.failPendingLocked(fmt.Errorf("%w: %w", ErrConnLost, rerr), gen)
	c.log.Warn("xenstore connection lost", "err", rerr)
	if !c.reconnect {
		c.mu.closed = true
		close(c.done)
		ws := c.mu.watches
		c.mu.watches = map[*Watch]struct{}{}
		c.mu.Unlock()
		for w := range ws {
			w.stop()
		}
		return
	}
	c.mu.conn = nil
	c.mu.ready = make(chan struct{})
	c.mu.Unlock()
	c.wg.Add(1)
	go c.redial()
}

// redial reconnects with backoff, then re-registers every watch.
func (c *Client) redial() {
	defer c.wg.Done()
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = 10 * time.Millisecond
	b.MaxInterval = 2 * time.Second
	b.MaxElapsedTime = 0
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-c.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	for {
		conn, err := c.dial(ctx)
		if err == nil {
			c.mu.Lock()
			if c.mu.closed {
				c.mu.Unlock()
				conn.Close()
				return
			}
			c.mu.gen++
			gen := c.mu.gen
			c.mu.conn = conn
			close(c.mu.ready)
			ws := make([]*Watch, 0, len(c.mu.watches))
			for w := range c.mu.watches {
				ws = append(ws, w)
			}
			c.mu.Unlock()
			c.wg.Add(1)
			go c.readLoop(conn, gen)
			for _, w := range ws {
				_, err := c.request(ctx, OpWatch, 0, joinStrings(w.path, w.token))
				if err != nil && !errors.Is(err, ErrExists) {
					c.log.Warn("xenstore re-watch failed", "path", w.path, "err", err)
				}
				w.push(Event{Path: w.path, Token: w.token, Overflow: true}, true)
			}
			return
		}
		d := b.NextBackOff()
		c.log.Debug("xenstore redial failed", "err", err, "retry_in", d)
		select {
		case <-time.After(d):
		case <-c.done:
			return
		}
	}
}

func (c *Client) deliver(m Message) {
	if m.Type == OpWatchEvent {
		parts, ok := splitStrings(m.Payload)
		if !ok || len(parts) < 2 {
			c.log.Warn("xenstore: malformed watch event", "payload", m.Payload)
			return
		}
		ev := Event{Path: parts[0], Token: parts[1]}
		c.mu.Lock()
		var targets []*Watch
		for w := range c.mu.watches {
			if w.token == ev.Token && (isUnderRel(ev.Path, w.path) || strings.HasPrefix(w.path, "@") && ev.Path == w.path) {
				targets = append(targets, w)
			}
		}
		c.mu.Unlock()
		for _, w := range targets {
			w.push(ev, false)
		}
		return
	}
	c.mu.Lock()
	p := c.mu.pending[m.ReqID]
	delete(c.mu.pending, m.ReqID)
	c.mu.Unlock()
	if p == nil {
		c.log.Debug("xenstore: reply to no request", "req", m.ReqID, "type", m.Type)
		return
	}
	p.reply <- m
}

// isUnderRel is isUnder for paths that may be relative.
func isUnderRel(p, base string) bool {
	if base == "/" {
		return strings.HasPrefix(p, "/")
	}
	return p == base || strings.HasPrefix(p, base) && len(p) > len(base) && p[len(base)] == '/'
}

// request sends one message and waits for its reply. XS_ERROR becomes an
// *Error.
func (c *Client) request(ctx context.Context, op Op, tx uint32, payload []byte) ([]byte, error) {
	if len(payload) > PayloadMax {
		return nil, fmt.Errorf("%w: %s request of %d bytes", ErrPayloadTooBig, op, len(payload))
	}
	for {
		c.mu.Lock()
		if c.mu.closed {
			c.mu.Unlock()
			return nil, ErrClosed
		}
		if c.mu.conn != nil {
			break
		}
		ready := c.mu.ready
		c.mu.Unlock()
		select {
		case <-ready:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	// Still holding c.mu.
	id := c.nextReq.Add(1)
	for c.mu.pending[id] != nil {
		id = c.nextReq.Add(1)
	}
	p := &call{gen: c.mu.gen, reply: make(chan Message, 1)}
	c.mu.pending[id] = p
	conn := c.mu.conn
	c.mu.Unlock()

	m := Message{Type: op, ReqID: id, TxID: tx, Payload: payload}
	b, _ := m.Append(nil)
	c.wmu.Lock()
	if d, ok := ctx.Deadline(); ok {
		conn.SetWriteDeadline(d)
	}
	_, err := conn.Write(b)
	if _, ok := ctx.Deadline(); ok {
		conn.SetWriteDeadline(time.Time{})
	}
	c.wmu.Unlock()
	if err != nil {
		c.forget(id)
		// A half-written message desynchronises the stream: drop it.
		conn.Close()
		return nil, fmt.Errorf("%w: %s: %w", ErrConnLost, op, err)
	}
	select {
	case r, ok := <-p.reply:
		if !ok {
			return nil, fmt.Errorf("%s: %w", op, p.err)
		}
		if r.Type == OpError {
			return nil, parseErrorPayload(r.Payload)
		}
		if r.Type != op {
			return nil, fmt.Errorf("%w: %s answered with %s", ErrProtocol, op, r.Type)
		}
		return r.Payload, nil
	case <-ctx.Done():
		c.forget(id)
		return nil, ctx.Err()
	}
}

func (c *Client) forget(id uint32) {
	c.mu.Lock()
	delete(c.mu.pending, id)
	c.mu.Unlock()
}

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
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = time.Millisecond
	b.MaxInterval = 100 * time.Millisecond
	b.MaxElapsedTime = 0
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

// Event is one watch firing. Overflow means events were dropped (or the
// connection was re-established): the consumer must re-read everything
// the watch covers.
type Event struct {
	Path, Token string
	Overflow    bool
}

// Watch delivers the events of one registered watch. Events arrive on a
// bounded queue that never blocks the client's reader.
type Watch struct {
	c     *Client
	path  string
	token string
	out   chan Event

	mu      sync.Mutex
	queue   []Event
	wake    chan struct{}
	stopped chan struct{}
	once    sync.Once
}

// Watch registers a watch on path (and everything beneath it). The server
// fires it once right away; xenstored may also fire spuriously, so treat
// each event as "something may have changed".
func (c *Client) Watch(ctx context.Context, path, token string) (*Watch, error) {
	w := &Watch{c: c, path: path, token: token, out: make(chan Event),
		wake: make(chan struct{}, 1), stopped: make(chan struct{})}
	// Register locally first so the initial event, which may arrive
	// before the reply is processed, is not lost.
	c.mu.Lock()
	if c.mu.closed {
		c.mu.Unlock()
		return nil, ErrClosed
	}
	c.mu.watches[w] = struct{}{}
	c.mu.Unlock()
	if _, err := c.request(ctx, OpWatch, 0, joinStrings(path, token)); err != nil {
		c.mu.Lock()
		delete(c.mu.watches, w)
		c.mu.Unlock()
		return nil, fmt.Errorf("watch %s: %w", path, err)
	}
	c.wg.Add(1)
	go w.pump()
	return w, nil
}

// Events returns the channel of events; it is closed by Close (of the
// watch or of the client).
func (w *Watch) Events() <-chan Event { return w.out }

// push queues ev. When the queue is full its contents are replaced by a
// single Overflow event: the consumer will re-read anyway.
func (w *Watch) push(ev Event, overflow bool) {
	w.mu.Lock()
	if overflow || len(w.queue) >= WatchQueueLen {
		w.queue = append(w.queue[:0], Event{Path: w.path, Token: w.token, Overflow: true})
	} else {
		w.queue = append(w.queue, ev)
	}
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

func (w *Watch) pump() {
	defer w.c.wg.Done()
	defer close(w.out)
	for {
		w.mu.Lock()
		if len(w.queue) == 0 {
			w.mu.Unlock()
			select {
			case <-w.wake:
				continue
			case <-w.stopped:
				return
			}
		}
		ev := w.queue[0]
		w.queue = w.queue[1:]
		w.mu.Unlock()
		select {
		case w.out <- ev:
		case <-w.stopped:
			return
		}
	}
}

func (w *Watch) stop() { w.once.Do(func() { close(w.stopped) }) }

// Close unregisters the watch (UNWATCH) and closes its channel.
func (w *Watch) Close() error {
	c := w.c
	c.mu.Lock()
	_, live := c.mu.watches[w]
	delete(c.mu.watches, w)
	c.mu.Unlock()
	w.stop()
	if !live {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.request(ctx, OpUnwatch, 0, joinStrings(w.path, w.token)); err != nil {
		if errors.Is(err, ErrClosed) {
			return nil
		}
		return fmt.Errorf("unwatch %s: %w", w.path, err)
	}
	return nil
}
