package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/internal/nbdwire"
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
	return img.waitAll(reqs)
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
	return img.waitAll(reqs)
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

// waitAll waits for every request of a split command, all of them even
// after one fails: a read or write part holds a slice of the caller's buffer.
func (img *Image) waitAll(reqs []*request) error {
	var errs []error
	for _, r := range reqs {
		errs = append(errs, img.wait(r))
	}
	return errors.Join(errs...)
}
