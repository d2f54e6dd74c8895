package xenstore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
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
		watches watchSet
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
	c.mu.watches = watchSet{}
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
	c.mu.watches = watchSet{}
	c.mu.Unlock()
	if conn != nil {
		conn.Close()
	}
	for _, w := range ws.all() {
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
		c.mu.watches = watchSet{}
		c.mu.Unlock()
		for _, w := range ws.all() {
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
	b := backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(10*time.Millisecond),
		backoff.WithMaxInterval(2*time.Second),
		backoff.WithMaxElapsedTime(0),
	)
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
			ws := c.mu.watches.all()
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
		for w := range c.mu.watches[ev.Token] {
			if isUnderRel(ev.Path, w.path) || strings.HasPrefix(w.path, "@") && ev.Path == w.path {
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
	rs, err := c.requests(ctx, op, tx, [][]byte{payload})
	if err != nil {
		return nil, err
	}
	return rs[0].payload, rs[0].err
}

// reply is one answer of a batch: its payload, or the XS_ERROR it got.
type reply struct {
	payload []byte
	err     error
}

// requests sends one message per payload, all in one write, and waits for
// every reply: a batch costs one round trip, not one per message. err is
// what failed the batch as a whole (the connection, ctx); each reply
// carries its own XS_ERROR.
func (c *Client) requests(ctx context.Context, op Op, tx uint32, payloads [][]byte) ([]reply, error) {
	var b []byte
	for _, payload := range payloads {
		if len(payload) > PayloadMax {
			return nil, fmt.Errorf("%w: %s request of %d bytes", ErrPayloadTooBig, op, len(payload))
		}
	}
	conn, ids, calls, err := c.register(ctx, len(payloads))
	if err != nil {
		return nil, err
	}
	for i, payload := range payloads {
		m := Message{Type: op, ReqID: ids[i], TxID: tx, Payload: payload}
		b, _ = m.Append(b)
	}
	c.wmu.Lock()
	if d, ok := ctx.Deadline(); ok {
		conn.SetWriteDeadline(d)
	}
	_, err = conn.Write(b)
	if _, ok := ctx.Deadline(); ok {
		conn.SetWriteDeadline(time.Time{})
	}
	c.wmu.Unlock()
	if err != nil {
		c.forget(ids...)
		// A half-written message desynchronises the stream: drop it.
		conn.Close()
		return nil, fmt.Errorf("%w: %s: %w", ErrConnLost, op, err)
	}
	out := make([]reply, len(calls))
	for i, p := range calls {
		select {
		case r, ok := <-p.reply:
			switch {
			case !ok:
				return nil, fmt.Errorf("%s: %w", op, p.err)
			case r.Type == OpError:
				out[i].err = parseErrorPayload(r.Payload)
			case r.Type != op:
				return nil, fmt.Errorf("%w: %s answered with %s", ErrProtocol, op, r.Type)
			default:
				out[i].payload = r.Payload
			}
		case <-ctx.Done():
			c.forget(ids[i:]...)
			return nil, ctx.Err()
		}
	}
	return out, nil
}

// register waits for a connection and records n pending calls on it.
func (c *Client) register(ctx context.Context, n int) (net.Conn, []uint32, []*call, error) {
	for {
		c.mu.Lock()
		if c.mu.closed {
			c.mu.Unlock()
			return nil, nil, nil, ErrClosed
		}
		if c.mu.conn != nil {
			break
		}
		ready := c.mu.ready
		c.mu.Unlock()
		select {
		case <-ready:
		case <-ctx.Done():
			return nil, nil, nil, ctx.Err()
		}
	}
	defer c.mu.Unlock()
	ids, calls := make([]uint32, n), make([]*call, n)
	for i := range n {
		id := c.nextReq.Add(1)
		for c.mu.pending[id] != nil {
			id = c.nextReq.Add(1)
		}
		calls[i] = &call{gen: c.mu.gen, reply: make(chan Message, 1)}
		c.mu.pending[id], ids[i] = calls[i], id
	}
	return c.mu.conn, ids, calls, nil
}

func (c *Client) forget(ids ...uint32) {
	c.mu.Lock()
	for _, id := range ids {
		delete(c.mu.pending, id)
	}
	c.mu.Unlock()
}
