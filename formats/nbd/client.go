package nbd

import (
	"bufio"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/blktap-go/blktap/internal/nbdwire"
	"io"
	"log/slog"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/image"
)

// Name is the format's canonical name.
const Name = "nbd"

// DefaultTimeout is the per-request deadline when Options.Timeout is 0.
const DefaultTimeout = 30 * time.Second

// Options control Open.
type Options struct {
	// ReadOnly refuses writes and discards locally; a read-only export
	// must be opened with it.
	ReadOnly bool
	// Timeout bounds every request from the call to its answer,
	// reconnections included, and the initial connect and handshake.
	// 0 means DefaultTimeout.
	Timeout time.Duration
	// Logger gets connection events (drops, reconnects); nil discards.
	Logger *slog.Logger

	// dial replaces net.Dial (tests: in-process fake servers).
	dial func(ctx context.Context) (net.Conn, error)
	// noReconnect fails pending requests when the connection drops
	// instead of reconnecting (the fuzz target's fake server).
	noReconnect bool
}

// Image is a remote NBD export used as a disk image. It implements
// image.Image and is safe for concurrent use.
type Image struct {
	uri      URI
	opts     Options
	log      *slog.Logger
	size     int64
	readOnly bool
	ctx      context.Context // cancelled by Close: stops reconnecting
	cancel   context.CancelFunc
	wg       sync.WaitGroup // the reader and reconnect goroutines

	mu   sync.Mutex
	cond sync.Cond // on mu: a request's claimed or sending changed
	// Fields below are guarded by mu.
	conn         *conn // nil while reconnecting
	info         exportInfo
	pending      map[uint64]*request
	nextCookie   uint64
	reconnecting bool
	closed       bool
	broken       error  // set when reconnecting has stopped for good
	writeSeq     uint64 // writes acknowledged so far
	flushedSeq   uint64 // writeSeq covered by the last successful flush
	lostWrites   bool   // acked, unflushed writes met a dropped connection
}

var _ image.Image = (*Image)(nil)

// conn is one connection. Its fields other than dead are set before it
// is shared; dead is guarded by Image.mu.
type conn struct {
	nc   net.Conn
	br   *bufio.Reader
	info exportInfo
	wmu  sync.Mutex // one request (header + payload) on the wire at a time
	dead bool
}

// request is one NBD command from submission to answer. It stays in
// Image.pending until answered, abandoned (timeout) or failed, and is sent
// again on every new connection while it is there.
type request struct {
	cmd    uint16
	flags  uint16
	off    int64
	length uint32
	buf    []byte // read: the caller's destination; write: the caller's data
	cookie uint64
	start  time.Time // submission: the deadline is start + Timeout
	done   chan struct{}

	// Guarded by Image.mu.
	sentOn    *conn // the connection it was last sent on
	sending   int   // sends of buf in progress
	claimed   bool  // a reader is writing into buf or the fields below
	finished  bool
	abandoned bool
	err       error
	// Reply state of the current connection: written by its reader
	// while claimed or under mu, reset when the request is sent again.
	covered []span // read: ranges the reply filled
	chunkEr error  // first error chunk
	extents []bsExtent
}

type span struct{ off, end int64 }

type bsExtent struct {
	length uint32
	flags  uint32
}

// Open connects to the export that uri names (see ParseURI), negotiates,
// and returns it as an image.
func Open(uri string, opts Options) (*Image, error) {
	return OpenContext(context.Background(), uri, opts)
}

// OpenContext is Open with a context for the initial connection.
func OpenContext(ctx context.Context, uri string, opts Options) (*Image, error) {
	u, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultTimeout
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	img := &Image{uri: u, opts: opts, log: log.With("nbd", u.String()), readOnly: opts.ReadOnly,
		pending: map[uint64]*request{}, nextCookie: 1}
	img.cond.L = &img.mu
	c, err := img.connect(ctx)
	if err != nil {
		return nil, err
	}
	if c.info.flags&nbdwire.TransReadOnly != 0 && !opts.ReadOnly {
		c.nc.Close()
		return nil, fmt.Errorf("nbd: %s: %w: the export is read-only; open it with ReadOnly", u, image.ErrReadOnly)
	}
	img.size = c.info.size
	img.info = c.info
	img.conn = c
	img.ctx, img.cancel = context.WithCancel(context.Background())
	img.wg.Add(1)
	go img.readLoop(c)
	img.log.Debug("nbd connected", "size", img.size, "flags", c.info.flags, "structured", c.info.structured,
		"block_status", c.info.hasMeta)
	return img, nil
}

// connect dials and negotiates one connection within Options.Timeout.
func (img *Image) connect(ctx context.Context) (*conn, error) {
	ctx, cancel := context.WithTimeout(ctx, img.opts.Timeout)
	defer cancel()
	var nc net.Conn
	var err error
	if img.opts.dial != nil {
		nc, err = img.opts.dial(ctx)
	} else {
		var d net.Dialer
		nc, err = d.DialContext(ctx, img.uri.Network, img.uri.Address)
	}
	if err != nil {
		return nil, fmt.Errorf("nbd: connect %s: %w", img.uri, err)
	}
	// The handshake must not hang on a silent server either; the
	// context's deadline becomes the socket's, and cancelling it (Close)
	// interrupts the handshake.
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	br := bufio.NewReaderSize(nc, 64<<10)
	info, err := handshake(br, nc, img.uri.Export)
	if !stop() || err != nil {
		nc.Close()
		if err == nil {
			err = ctx.Err()
		}
		return nil, fmt.Errorf("nbd: %s: handshake: %w", img.uri, err)
	}
	nc.SetDeadline(time.Time{})
	return &conn{nc: nc, br: br, info: info}, nil
}

// Size returns the export's size in bytes.
func (img *Image) Size() int64 { return img.size }

// ReadOnly reports whether the image refuses writes.
func (img *Image) ReadOnly() bool { return img.readOnly }

// URI returns the parsed URI the image connects to.
func (img *Image) URI() URI { return img.uri }

func (img *Image) errf(format string, args ...any) error {
	return fmt.Errorf("nbd: %s: %w", img.uri, fmt.Errorf(format, args...))
}

func (img *Image) checkRange64(off, length int64) error {
	if err := image.CheckRange64(off, length, img.size); err != nil {
		return img.errf("%w", err)
	}
	return nil
}

func (img *Image) maxPayload() int {
	img.mu.Lock()
	defer img.mu.Unlock()
	return int(img.info.maxPayload)
}

// ReadAt reads len(p) bytes at off. Reads larger than the server's
// maximum payload go out as several requests in flight at once.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if err := image.CheckRange(off, len(p), img.size); err != nil {
		return 0, img.errf("%w", err)
	}
	if err := img.rw(nbdwire.CmdRead, p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt writes p at off; it returns once the server acknowledged it.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if img.readOnly {
		return 0, img.errf("write: %w", image.ErrReadOnly)
	}
	if err := image.CheckRange(off, len(p), img.size); err != nil {
		return 0, img.errf("%w", err)
	}
	if err := img.rw(nbdwire.CmdWrite, p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (img *Image) rw(cmd uint16, p []byte, off int64) error {
	if len(p) == 0 {
		return img.checkOpen()
	}
	mp := img.maxPayload()
	if len(p) <= mp {
		return img.do(&request{cmd: cmd, off: off, length: uint32(len(p)), buf: p})
	}
	var reqs []*request
	for i := 0; i < len(p); i += mp {
		n := min(mp, len(p)-i)
		r := &request{cmd: cmd, off: off + int64(i), length: uint32(n), buf: p[i : i+n]}
		img.submit(r)
		reqs = append(reqs, r)
	}
	var errs []error
	for _, r := range reqs {
		errs = append(errs, img.wait(r))
	}
	return errors.Join(errs...)
}

func (img *Image) checkOpen() error {
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.closed {
		return img.errf("%w", image.ErrClosed)
	}
	return nil
}

// Flush asks the server to make every acknowledged write durable. A server
// that does not offer FLUSH declares it has no volatile write cache
// (proto.md, NBD_FLAG_SEND_FLUSH), so an acknowledged write is already as
// durable as it will get and Flush returns nil at once.
//
// If the connection dropped while acknowledged writes were not yet
// flushed, a server that crashed may have lost them, and flushing the new
// connection cannot bring them back: the next successful FLUSH then
// returns an error wrapping unix.EIO, once, as fsync reports a lost
// writeback.
func (img *Image) Flush() error {
	img.mu.Lock()
	closed, flags, seq := img.closed, img.info.flags, img.writeSeq
	img.mu.Unlock()
	if closed {
		return img.errf("%w", image.ErrClosed)
	}
	if img.readOnly || flags&nbdwire.TransSendFlush == 0 {
		return nil
	}
	if err := img.do(&request{cmd: nbdwire.CmdFlush}); err != nil {
		return err
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	img.flushedSeq = max(img.flushedSeq, seq)
	if img.lostWrites {
		img.lostWrites = false
		return img.errf("flush: writes acknowledged before the connection dropped may be lost: %w", unix.EIO)
	}
	return nil
}

// Discard makes [off, off+length) read as zeros with WRITE_ZEROES, which
// lets the server punch holes. TRIM is not used: the protocol leaves
// trimmed data undefined, and the image contract promises zeros. A server
// without WRITE_ZEROES gets image.ErrUnsupported.
func (img *Image) Discard(off, length int64) error {
	if img.readOnly {
		return img.errf("discard: %w", image.ErrReadOnly)
	}
	return img.zeroish(nbdwire.CmdWriteZeroes, nbdwire.TransSendWriteZeroes, off, length)
}

// Trim sends TRIM: a hint that the range is unused, after which its
// contents are undefined. It returns image.ErrUnsupported when the server
// does not offer TRIM.
func (img *Image) Trim(off, length int64) error {
	if img.readOnly {
		return img.errf("trim: %w", image.ErrReadOnly)
	}
	return img.zeroish(nbdwire.CmdTrim, nbdwire.TransSendTrim, off, length)
}

func (img *Image) zeroish(cmd uint16, flag uint16, off, length int64) error {
	if err := img.checkRange64(off, length); err != nil {
		return err
	}
	img.mu.Lock()
	closed, flags := img.closed, img.info.flags
	img.mu.Unlock()
	if closed {
		return img.errf("%w", image.ErrClosed)
	}
	if flags&flag == 0 {
		return img.errf("%s: %w: the server does not offer it", nbdwire.CmdName(cmd), image.ErrUnsupported)
	}
	// The length field is 32 bits; 1 GiB pieces stay aligned.
	const piece = 1 << 30
	var reqs []*request
	for cur := off; cur < off+length; cur += piece {
		r := &request{cmd: cmd, off: cur, length: uint32(min(piece, off+length-cur))}
		img.submit(r)
		reqs = append(reqs, r)
	}
	var errs []error
	for _, r := range reqs {
		errs = append(errs, img.wait(r))
	}
	return errors.Join(errs...)
}

// Map describes [off, off+length) from the server's base:allocation block
// status: holes (HOLE|ZERO), zeros (ZERO) and data. A server without block
// status gets the whole range reported as Data, which is always safe.
func (img *Image) Map(off, length int64) ([]image.Extent, error) {
	if err := img.checkRange64(off, length); err != nil {
		return nil, err
	}
	img.mu.Lock()
	closed, hasMeta := img.closed, img.info.hasMeta
	img.mu.Unlock()
	if closed {
		return nil, img.errf("%w", image.ErrClosed)
	}
	if length == 0 {
		return nil, nil
	}
	if !hasMeta {
		return []image.Extent{{Offset: off, Length: length, Kind: image.Data}}, nil
	}
	var out []image.Extent
	add := func(o, n int64, k image.ExtentKind) {
		if l := len(out); l > 0 && out[l-1].Kind == k && out[l-1].Offset+out[l-1].Length == o {
			out[l-1].Length += n
			return
		}
		out = append(out, image.Extent{Offset: o, Length: n, Kind: k})
	}
	for cur, end := off, off+length; cur < end; {
		ask := min(end-cur, 1<<30)
		r := &request{cmd: nbdwire.CmdBlockStatus, off: cur, length: uint32(ask)}
		if err := img.do(r); err != nil {
			return nil, err
		}
		got := int64(0)
		for _, e := range r.extents {
			n := min(int64(e.length), ask-got)
			if n <= 0 {
				break // the last extent may reach past what we asked
			}
			kind := image.Data
			switch e.flags & (nbdwire.StateHole | nbdwire.StateZero) {
			case nbdwire.StateHole | nbdwire.StateZero:
				kind = image.Hole
			case nbdwire.StateZero:
				kind = image.Zero
			}
			add(cur+got, n, kind)
			got += n
		}
		if got == 0 {
			return nil, img.errf("map %d+%d: %w: block status described no bytes", cur, ask, ErrProtocol)
		}
		cur += got
	}
	return out, nil
}

// do submits r and waits for its answer.
func (img *Image) do(r *request) error {
	img.submit(r)
	return img.wait(r)
}

// submit registers r and sends it on the current connection; without one,
// the reconnection sends it.
func (img *Image) submit(r *request) {
	r.done = make(chan struct{})
	r.start = time.Now()
	img.mu.Lock()
	if img.closed || img.broken != nil {
		err := img.broken
		if img.closed {
			err = image.ErrClosed
		}
		r.finished, r.err = true, img.errf("%s: %w", nbdwire.CmdName(r.cmd), err)
		close(r.done)
		img.mu.Unlock()
		return
	}
	r.cookie = img.nextCookie
	img.nextCookie++
	img.pending[r.cookie] = r
	c := img.conn
	if c != nil {
		r.sentOn = c
		r.sending++
	}
	img.mu.Unlock()
	if c != nil {
		img.send(c, r)
	}
}

// send writes r on c; the caller has counted it in r.sending.
func (img *Image) send(c *conn, r *request) {
	var hdr [nbdwire.RequestSize]byte
	nbdwire.PutRequest(hdr[:], nbdwire.Request{Flags: r.flags, Type: r.cmd, Cookie: r.cookie, Offset: uint64(r.off), Length: uint64(r.length)}, false)
	c.wmu.Lock()
	var err error
	if r.cmd == nbdwire.CmdWrite {
		bufs := net.Buffers{hdr[:], r.buf}
		_, err = bufs.WriteTo(c.nc)
	} else {
		_, err = c.nc.Write(hdr[:])
	}
	c.wmu.Unlock()
	img.mu.Lock()
	r.sending--
	if r.abandoned {
		img.cond.Broadcast()
	}
	img.mu.Unlock()
	if err != nil {
		img.connFailed(c, fmt.Errorf("send %s: %w", nbdwire.CmdName(r.cmd), err))
	}
}

// wait blocks until r is answered or its deadline passes.
func (img *Image) wait(r *request) error {
	t := time.NewTimer(img.opts.Timeout - time.Since(r.start))
	select {
	case <-r.done:
		t.Stop()
		return r.err
	case <-t.C:
	}
	img.mu.Lock()
	if r.finished {
		img.mu.Unlock()
		<-r.done
		return r.err
	}
	r.abandoned = true
	delete(img.pending, r.cookie)
	c := r.sentOn
	img.mu.Unlock()
	if c != nil {
		// The server has not answered within the deadline: the
		// connection is stuck or the server is gone. Dropping it
		// unblocks a reader or sender using r's buffer, and the next
		// connection serves the other requests.
		img.connFailed(c, fmt.Errorf("%s %d+%d: no answer within %v", nbdwire.CmdName(r.cmd), r.off, r.length, img.opts.Timeout))
	}
	img.mu.Lock()
	// The caller may reuse its buffer once we return: wait until no
	// goroutine is reading or writing it.
	for r.claimed || r.sending > 0 {
		img.cond.Wait()
	}
	img.mu.Unlock()
	return img.errf("%s %d+%d: %w: %w", nbdwire.CmdName(r.cmd), r.off, r.length, ErrTimeout, unix.EIO)
}

// finishLocked answers r; mu is held.
func (img *Image) finishLocked(r *request, err error) {
	if r.finished {
		return
	}
	r.finished, r.err = true, err
	delete(img.pending, r.cookie)
	if err == nil && (r.cmd == nbdwire.CmdWrite || r.cmd == nbdwire.CmdWriteZeroes || r.cmd == nbdwire.CmdTrim) {
		// Counted at the acknowledgement, under the same lock a drop
		// takes, so no acknowledged write escapes the lost-write check.
		img.writeSeq++
	}
	close(r.done)
}

// failAllLocked finishes every pending request with err. The connections
// must already be closed: it waits (releasing mu) until no reader or sender
// still uses a request's buffer, since its caller may reuse the buffer as
// soon as the request is finished.
func (img *Image) failAllLocked(err error) {
	rs := make([]*request, 0, len(img.pending))
	for _, r := range img.pending {
		r.abandoned = true
		rs = append(rs, r)
	}
	clear(img.pending)
	for _, r := range rs {
		for r.claimed || r.sending > 0 {
			img.cond.Wait()
		}
		img.finishLocked(r, img.errf("%s: %w", nbdwire.CmdName(r.cmd), err))
	}
}

// connFailed drops c (once) and starts reconnecting if c was current.
func (img *Image) connFailed(c *conn, err error) {
	img.mu.Lock()
	if c.dead {
		img.mu.Unlock()
		return
	}
	c.dead = true
	c.nc.Close()
	closed := img.closed
	start := false
	if img.conn == c {
		img.conn = nil
		if img.writeSeq > img.flushedSeq && c.info.flags&nbdwire.TransSendFlush != 0 {
			img.lostWrites = true
		}
		if img.opts.noReconnect {
			img.broken = fmt.Errorf("%w: %w", ErrDisconnected, unix.EIO)
			img.failAllLocked(img.broken)
		} else if !closed && !img.reconnecting {
			img.reconnecting, start = true, true
			img.wg.Add(1)
		}
	}
	img.cond.Broadcast()
	img.mu.Unlock()
	if !closed {
		img.log.Warn("nbd connection dropped", "err", err)
	}
	if start {
		go img.reconnectLoop()
	}
}

// reconnectLoop connects again with exponential backoff until it
// succeeds or the image is closed, then sends every pending request on
// the new connection. Reads and writes are idempotent at block level, so
// sending one twice (once before the drop, once now) is harmless.
func (img *Image) reconnectLoop() {
	defer img.wg.Done()
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = 20 * time.Millisecond
	b.MaxInterval = 2 * time.Second
	b.MaxElapsedTime = 0 // until Close: each request has its own deadline
	attempt := 0
	op := func() error {
		attempt++
		c, err := img.connect(img.ctx)
		if err != nil {
			img.log.Debug("nbd reconnect failed", "attempt", attempt, "err", err)
			return err
		}
		if c.info.size != img.size {
			c.nc.Close()
			img.log.Error("nbd export changed size; not using it", "was", img.size, "now", c.info.size)
			return fmt.Errorf("export size changed from %d to %d", img.size, c.info.size)
		}
		img.install(c)
		img.log.Info("nbd reconnected", "attempt", attempt)
		return nil
	}
	if err := backoff.Retry(op, backoff.WithContext(b, img.ctx)); err != nil {
		img.mu.Lock()
		img.reconnecting = false
		img.mu.Unlock()
	}
}

// install makes c current and sends it every pending request.
func (img *Image) install(c *conn) {
	img.mu.Lock()
	if img.closed {
		img.reconnecting = false
		img.mu.Unlock()
		c.nc.Close()
		return
	}
	// A reader of a dead connection may still be filling a buffer; the
	// new reader must not start on the same request before it is done.
	for img.anyClaimedLocked() {
		img.cond.Wait()
	}
	img.conn = c
	img.info = c.info
	img.reconnecting = false
	resend := make([]*request, 0, len(img.pending))
	for _, r := range img.pending {
		if r.sentOn != c {
			r.sentOn = c
			r.sending++
			r.covered, r.chunkEr, r.extents = r.covered[:0], nil, nil
			resend = append(resend, r)
		}
	}
	img.wg.Add(1)
	img.mu.Unlock()
	go img.readLoop(c)
	// In cookie order, so the server sees the original submission order.
	slices.SortFunc(resend, func(a, b *request) int { return cmp.Compare(a.cookie, b.cookie) })
	for _, r := range resend {
		img.send(c, r)
	}
}

func (img *Image) anyClaimedLocked() bool {
	for _, r := range img.pending {
		if r.claimed {
			return true
		}
	}
	return false
}

// readLoop reads replies on c until it fails, matching each to its
// request by cookie.
func (img *Image) readLoop(c *conn) {
	defer img.wg.Done()
	var err error
	for err == nil {
		err = img.readReply(c)
	}
	img.connFailed(c, err)
}

// lookup finds the pending request a reply names; it must have been sent
// on c (a reply on the wrong connection is the server's fault).
func (img *Image) lookupLocked(c *conn, cookie uint64) (*request, error) {
	if c.dead {
		return nil, errors.New("connection closed")
	}
	r := img.pending[cookie]
	if r == nil || r.sentOn != c {
		return nil, protoErr("reply for cookie %d, which has no request in flight", cookie)
	}
	return r, nil
}

// readReply reads one simple reply or one structured chunk (layouts in
// internal/nbdwire), and a good READ's data after a simple reply.
func (img *Image) readReply(c *conn) error {
	var h [nbdwire.ChunkHeaderSize]byte
	if _, err := io.ReadFull(c.br, h[:4]); err != nil {
		return err
	}
	m := binary.BigEndian.Uint32(h[0:4])
	switch m {
	case nbdwire.MagicSimpleReply:
	case nbdwire.MagicChunkReply:
		if !c.info.structured {
			return protoErr("structured reply chunk without negotiating structured replies")
		}
	case nbdwire.MagicExtReply:
		return protoErr("extended-header reply, which we never negotiated")
	default:
		return protoErr("reply magic %#x", m)
	}
	n := nbdwire.ReplySize(m)
	if _, err := io.ReadFull(c.br, h[4:n]); err != nil {
		return err
	}
	r, err := nbdwire.ParseReply(h[:n])
	if err != nil {
		return protoErr("%v", err)
	}
	if r.Magic == nbdwire.MagicSimpleReply {
		return img.simpleReply(c, r.Error, r.Cookie)
	}
	return img.chunk(c, r.Flags, r.Type, r.Cookie, uint32(r.Length))
}

func (img *Image) simpleReply(c *conn, code uint32, cookie uint64) error {
	img.mu.Lock()
	r, err := img.lookupLocked(c, cookie)
	if err != nil {
		img.mu.Unlock()
		return err
	}
	if code != 0 {
		img.finishLocked(r, &ServerError{Cmd: nbdwire.CmdName(r.cmd), Code: code, Errno: errnoOf(code)})
		img.mu.Unlock()
		return nil
	}
	if r.cmd == nbdwire.CmdBlockStatus {
		img.mu.Unlock()
		return protoErr("simple reply to BLOCK_STATUS")
	}
	if r.cmd != nbdwire.CmdRead {
		img.finishLocked(r, nil)
		img.mu.Unlock()
		return nil
	}
	r.claimed = true
	img.mu.Unlock()
	_, err = io.ReadFull(c.br, r.buf)
	img.mu.Lock()
	defer img.mu.Unlock()
	r.claimed = false
	img.cond.Broadcast()
	if err != nil {
		return err
	}
	if !r.abandoned && r.sentOn == c {
		img.finishLocked(r, nil)
	}
	return nil
}

func (img *Image) chunk(c *conn, flags, typ uint16, cookie uint64, length uint32) error {
	img.mu.Lock()
	r, err := img.lookupLocked(c, cookie)
	if err != nil {
		img.mu.Unlock()
		return err
	}
	var perr error // a protocol error: the connection must go
	switch {
	case typ == nbdwire.ChunkNone:
		if length != 0 || flags&nbdwire.ChunkFlagDone == 0 {
			perr = protoErr("NONE chunk of %d bytes, flags %#x", length, flags)
		}
	case typ == nbdwire.ChunkOffsetData || typ == nbdwire.ChunkOffsetHole:
		if r.cmd != nbdwire.CmdRead {
			perr = protoErr("read data for %s", nbdwire.CmdName(r.cmd))
			break
		}
		r.claimed = true
		img.mu.Unlock()
		perr = img.readChunk(c, r, typ, length)
		img.mu.Lock()
		r.claimed = false
		img.cond.Broadcast()
	case typ == nbdwire.ChunkBlockStatus:
		if r.cmd != nbdwire.CmdBlockStatus {
			perr = protoErr("block status for %s", nbdwire.CmdName(r.cmd))
			break
		}
		img.mu.Unlock()
		ext, err := readBlockStatus(c, length)
		img.mu.Lock()
		if err != nil {
			perr = err
		} else if !r.abandoned && r.sentOn == c {
			r.extents = append(r.extents, ext...)
		}
	case typ&nbdwire.ChunkErrorBit != 0:
		img.mu.Unlock()
		serr, err := readErrorChunk(c, r.cmd, typ, length)
		img.mu.Lock()
		if err != nil {
			perr = err
		} else if r.chunkEr == nil {
			r.chunkEr = serr
		}
	default:
		perr = protoErr("unknown chunk type %d", typ)
	}
	if perr != nil {
		img.mu.Unlock()
		return perr
	}
	if flags&nbdwire.ChunkFlagDone != 0 && !r.abandoned && r.sentOn == c {
		img.finishLocked(r, img.replyResultLocked(r))
	}
	img.mu.Unlock()
	return nil
}

// replyResultLocked decides a structured reply's outcome at its DONE
// chunk: an error chunk wins; a read must have been covered exactly.
func (img *Image) replyResultLocked(r *request) error {
	if r.chunkEr != nil {
		return r.chunkEr
	}
	switch r.cmd {
	case nbdwire.CmdRead:
		slices.SortFunc(r.covered, func(a, b span) int { return cmp.Compare(a.off, b.off) })
		next := r.off
		for _, s := range r.covered {
			if s.off != next {
				break
			}
			next = s.end
		}
		if next != r.off+int64(r.length) {
			return img.errf("READ %d+%d: %w: the reply did not cover byte %d: %w",
				r.off, r.length, ErrProtocol, next, unix.EIO)
		}
	case nbdwire.CmdBlockStatus:
		if len(r.extents) == 0 {
			return img.errf("BLOCK_STATUS: %w: no extents: %w", ErrProtocol, unix.EIO)
		}
	}
	return nil
}

// readChunk reads an OFFSET_DATA or OFFSET_HOLE chunk into r's buffer;
// the caller has claimed r.
//
//	OFFSET_DATA: | u64 offset | data (length-8 bytes) |
//	OFFSET_HOLE: | u64 offset | u32 hole size |
func (img *Image) readChunk(c *conn, r *request, typ uint16, length uint32) error {
	var b [12]byte
	if length < 9 || (typ == nbdwire.ChunkOffsetHole && length != 12) {
		return protoErr("%d-byte chunk of type %d", length, typ)
	}
	n := 8
	if typ == nbdwire.ChunkOffsetHole {
		n = 12
	}
	if _, err := io.ReadFull(c.br, b[:n]); err != nil {
		return err
	}
	off := binary.BigEndian.Uint64(b[0:8])
	size := uint64(length) - 8
	if typ == nbdwire.ChunkOffsetHole {
		size = uint64(binary.BigEndian.Uint32(b[8:12]))
	}
	start, end := uint64(r.off), uint64(r.off)+uint64(r.length)
	if size == 0 || off < start || off > end || size > end-off {
		return protoErr("chunk for %d+%d outside READ %d+%d", off, size, r.off, r.length)
	}
	dst := r.buf[off-start : off-start+size]
	if typ == nbdwire.ChunkOffsetHole {
		clear(dst)
	} else if _, err := io.ReadFull(c.br, dst); err != nil {
		return err
	}
	for _, s := range r.covered {
		if int64(off) < s.end && s.off < int64(off+size) {
			return protoErr("READ chunks overlap at %d", off)
		}
	}
	r.covered = append(r.covered, span{int64(off), int64(off + size)})
	return nil
}

// readBlockStatus reads a BLOCK_STATUS chunk:
//
//	| u32 context id | { u32 length | u32 flags } ... |
func readBlockStatus(c *conn, length uint32) ([]bsExtent, error) {
	if length < 12 || (length-4)%8 != 0 || length > maxChunkMeta {
		return nil, protoErr("BLOCK_STATUS chunk of %d bytes", length)
	}
	b := make([]byte, length)
	if _, err := io.ReadFull(c.br, b); err != nil {
		return nil, err
	}
	if id := binary.BigEndian.Uint32(b[0:4]); !c.info.hasMeta || id != c.info.metaID {
		return nil, protoErr("block status for context %d, negotiated %d", id, c.info.metaID)
	}
	ext := make([]bsExtent, 0, (length-4)/8)
	for p := 4; p < len(b); p += 8 {
		e := bsExtent{binary.BigEndian.Uint32(b[p:]), binary.BigEndian.Uint32(b[p+4:])}
		if e.length == 0 {
			return nil, protoErr("zero-length block status extent")
		}
		ext = append(ext, e)
	}
	return ext, nil
}

// readErrorChunk reads an error chunk:
//
//	| u32 error | u16 message length | message | (ERROR_OFFSET: u64 offset) |
func readErrorChunk(c *conn, cmd uint16, typ uint16, length uint32) (*ServerError, error) {
	if length < 6 || length > maxChunkMeta {
		return nil, protoErr("error chunk of %d bytes", length)
	}
	b := make([]byte, length)
	if _, err := io.ReadFull(c.br, b); err != nil {
		return nil, err
	}
	code := binary.BigEndian.Uint32(b[0:4])
	mlen := int(binary.BigEndian.Uint16(b[4:6]))
	if mlen > len(b)-6 {
		return nil, protoErr("error message of %d bytes in a %d-byte chunk", mlen, length)
	}
	if code == 0 {
		// An error chunk must carry an error; treat it as EIO rather
		// than report success.
		code = 5
	}
	msg := string(b[6 : 6+mlen])
	if typ == nbdwire.ChunkErrorBit|2 && len(b)-6-mlen >= 8 {
		msg += fmt.Sprintf(" (at offset %d)", binary.BigEndian.Uint64(b[6+mlen:]))
	}
	return &ServerError{Cmd: nbdwire.CmdName(cmd), Code: code, Errno: errnoOf(code), Message: msg}, nil
}

// Close flushes, says goodbye to the server and releases everything.
// Requests still waiting fail with image.ErrClosed. A second Close
// returns image.ErrClosed.
func (img *Image) Close() error {
	img.mu.Lock()
	if img.closed {
		img.mu.Unlock()
		return img.errf("%w", image.ErrClosed)
	}
	img.mu.Unlock()
	ferr := img.Flush()
	img.mu.Lock()
	if img.closed {
		img.mu.Unlock()
		return img.errf("%w", image.ErrClosed)
	}
	img.closed = true
	c := img.conn
	img.mu.Unlock()
	img.cancel()
	if c != nil {
		// DISC has no reply; best effort, bounded by a deadline.
		var hdr [nbdwire.RequestSize]byte
		nbdwire.PutRequest(hdr[:], nbdwire.Request{Type: nbdwire.CmdDisc}, false)
		c.wmu.Lock()
		c.nc.SetWriteDeadline(time.Now().Add(time.Second))
		c.nc.Write(hdr[:])
		c.wmu.Unlock()
		img.connFailed(c, errors.New("closed"))
	}
	img.mu.Lock()
	img.failAllLocked(image.ErrClosed)
	img.mu.Unlock()
	img.wg.Wait()
	return ferr
}
