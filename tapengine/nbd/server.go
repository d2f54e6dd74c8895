package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/internal/nbdwire"
	"github.com/blktap-go/blktap/tapengine/idle"
)

// Backend is what an export serves. image.Image satisfies it. It must be
// safe for concurrent use: requests of one connection run in parallel, and
// so do those of many connections.
type Backend interface {
	io.ReaderAt
	io.WriterAt
	Size() int64
	// Flush makes every completed write durable, whichever connection
	// made it. That is what lets the export advertise CAN_MULTI_CONN.
	Flush() error
}

// Discarder is the optional capability behind NBD_CMD_TRIM (and the
// WRITE_ZEROES fallback when holes are allowed): afterwards the range
// reads as zeros.
type Discarder interface {
	Discard(off, length int64) error
}

// Mapper is the optional capability behind block status (base:allocation
// and qemu:allocation-depth) and sparse reads (OFFSET_HOLE chunks).
type Mapper interface {
	Map(off, length int64) ([]image.Extent, error)
}

// ZeroWriter is the optional capability behind NBD_CMD_WRITE_ZEROES. It is
// taken to be fast (no data written byte by byte); an error wrapping
// errors.ErrUnsupported makes the server fall back to Discard or to
// writing zeros, or answer ENOTSUP to a FAST_ZERO request.
type ZeroWriter interface {
	WriteZeroes(off, length int64, mayTrim bool) error
}

// Completer receives the results of an AsyncBackend's calls (the same
// type as frontend.Completer: an alias of one interface literal).
type Completer = interface {
	// Complete reports one started request; data (reads) is valid only
	// until it returns.
	Complete(cookie uint64, data []byte, err error)
	// CompleteBatch follows the Complete calls of one batch.
	CompleteBatch()
}

// AsyncBackend is the optional capability of a RoundTrip backend (the
// local frontend, whose ring is the round trip) that starts a read or
// write and reports it later, on a goroutine of its own, to a Completer.
// The reader then starts every aligned READ and WRITE (without FUA) of up
// to MaxPayload itself, in parts of up to StartMax bytes, and the
// backend's goroutine answers it: no request waits on a hand-off.
//
//  1. Buffers. The backend lends its request buffers (the frontend's
//     granted pages), one per tag of StartMax bytes, the server's from
//     TakeTag until PutTag: a WRITE's payload is read from the socket
//     straight into them and a READ's reply written straight from the
//     data StartTagRead completes with (valid until PutTag). A request
//     needing more tags than a few is started with StartRead/StartWrite
//     on a buffer of the server's instead, so that a few big requests
//     cannot hold every tag. TakeTag may wait for a tag, but publishes
//     what it holds back first; its error means the backend is gone.
//  2. Publishing. Started requests may be held back until Publish, which
//     the reader calls before it waits for its client.
//  3. Polling. Poll publishes what is held back, as Publish, then
//     collects completions on the caller's goroutine, busy, for up to
//     spin (Completer calls then run there); the reader calls it instead
//     of Publish when its client waits for every answer (queue depth 1).
type AsyncBackend interface {
	StartMax() int
	StartRead(off int64, n int, c Completer, cookie uint64) error
	StartWrite(p []byte, off int64, c Completer, cookie uint64) error
	TakeTag() (tag uint64, buf []byte, err error)
	StartTagRead(tag uint64, off int64, n int, c Completer, cookie uint64) error
	StartTagWrite(tag uint64, off int64, n int, c Completer, cookie uint64) error
	PutTag(tag uint64)
	Publish() error
	Poll(spin time.Duration) bool
}

// Export is one named disk.
type Export struct {
	Name        string // clients may also ask for "" (the default export)
	Description string
	Backend     Backend
	ReadOnly    bool
	// NoMultiConn withholds CAN_MULTI_CONN. Leave it false when
	// Backend.Flush covers writes made through every connection (true of
	// every image.Image), so clients may spread I/O over connections.
	NoMultiConn bool
	// RoundTrip marks a backend whose every call is a round trip to
	// somewhere else (the local frontend's ring): the reader then runs a
	// read itself only when no other request is waiting, and otherwise
	// hands them all to the workers, since requests in flight together
	// are what lets the other side batch.
	RoundTrip bool
	// InlineWrites lets the reader run writes itself (no FUA, at most 1
	// MiB), as it does small reads: a hand-off per write costs more than
	// it buys on a local file, whose writes serialise on the inode lock,
	// and the payload the reader just read is still in its CPU's cache.
	// Set it only for a backend whose writes never wait on a later
	// request (a local image file): the reader reads nothing more until
	// the write returns. One that turns out slow (a flush of dirty
	// pages, a cluster allocation) sends the next requests to the workers
	// for a while.
	InlineWrites bool
	// Workers bounds the goroutines that run one connection's requests
	// (0: 16, at most MaxInFlight). A backend whose calls wait on a network
	// while holding no thread (rbd's aio) wants one per request in flight.
	Workers int
}

// Stats are cumulative counters of a Server.
type Stats struct {
	Connections  uint64 // accepted connections (handshake started)
	Active       int64  // connections open now
	Reads        uint64
	Writes       uint64
	BytesRead    uint64 // payload bytes sent to clients
	BytesWritten uint64 // payload bytes written to the backend
	Flushes      uint64
	Trims        uint64
	Zeroes       uint64 // WRITE_ZEROES requests
	BlockStatus  uint64
	Errors       uint64 // requests answered with an error
	Dropped      uint64 // connections dropped for protocol violations
}

type counters struct {
	connections, reads, writes, bytesRead, bytesWritten  atomic.Uint64
	flushes, trims, zeroes, blockStatus, errors, dropped atomic.Uint64
	active                                               atomic.Int64
}

// Server serves one Export over NBD. Set its fields, then call Serve or
// ServeConn; do not change them afterwards. A Server is safe for
// concurrent use.
type Server struct {
	Export      Export
	Logger      *slog.Logger
	MaxInFlight int // requests in flight per connection; 0 = 64
	// HandshakeTimeout bounds option haggling; 0 = 60 s. A client that
	// has not chosen an export by then is dropped.
	HandshakeTimeout time.Duration
	// ShutdownGrace bounds how long Close waits for a connection whose
	// client stopped reading its replies; 0 = 10 s.
	ShutdownGrace time.Duration
	// TLSConfig, when set, makes the server TLS-only (FORCEDTLS in
	// proto.md): a client must send NBD_OPT_STARTTLS before anything
	// else, and every other option before it is refused with
	// NBD_REP_ERR_TLS_REQD. nil offers no TLS (STARTTLS gets
	// NBD_REP_ERR_POLICY). It needs a certificate; set ClientAuth and
	// ClientCAs to require client certificates (LoadTLSConfig does).
	TLSConfig *tls.Config
	// Bell, when set, is rung for every request read: an idle-time
	// poller over Stats (package idle) can sleep while nothing comes.
	Bell *idle.Doorbell

	stats counters

	once   sync.Once
	base   context.Context // cancelled by Close
	cancel context.CancelFunc
	mu     sync.Mutex
	lns    map[net.Listener]struct{}
	closed bool
	conns  sync.WaitGroup
}

func (s *Server) init() {
	s.once.Do(func() {
		s.base, s.cancel = context.WithCancel(context.Background())
		s.lns = make(map[net.Listener]struct{})
	})
}

func (s *Server) logger() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.New(slog.DiscardHandler)
}

func (s *Server) maxInFlight() int {
	if s.MaxInFlight > 0 {
		return s.MaxInFlight
	}
	return 64
}

// matches reports whether a client's export name selects our export.
func (s *Server) matches(name string) bool {
	return name == "" || name == s.Export.Name
}

// tflags computes the transmission flags for a session: what qemu-nbd
// advertises, plus CAN_MULTI_CONN where honest.
func (s *Server) tflags(sess *session) uint16 {
	f := uint16(nbdwire.TransHasFlags | nbdwire.TransSendFlush | nbdwire.TransSendFUA | nbdwire.TransSendCache)
	if s.Export.ReadOnly {
		f |= nbdwire.TransReadOnly
	} else {
		f |= nbdwire.TransSendWriteZeroes | nbdwire.TransSendFastZero
		if _, ok := s.Export.Backend.(Discarder); ok {
			f |= nbdwire.TransSendTrim
		}
	}
	if sess.structured {
		f |= nbdwire.TransSendDF
	}
	if !s.Export.NoMultiConn {
		f |= nbdwire.TransCanMultiConn
	}
	return f
}

// Stats returns a snapshot of the counters.
func (s *Server) Stats() Stats {
	c := &s.stats
	return Stats{
		Connections: c.connections.Load(), Active: c.active.Load(),
		Reads: c.reads.Load(), Writes: c.writes.Load(),
		BytesRead: c.bytesRead.Load(), BytesWritten: c.bytesWritten.Load(),
		Flushes: c.flushes.Load(), Trims: c.trims.Load(), Zeroes: c.zeroes.Load(),
		BlockStatus: c.blockStatus.Load(), Errors: c.errors.Load(), Dropped: c.dropped.Load(),
	}
}

// ErrServerClosed is returned by Serve and ServeConn after Close.
var ErrServerClosed = errors.New("nbd: server closed")

// Serve accepts connections on ln until ctx is done, Close is called or ln
// fails; each connection is served on its own goroutine and a bad client
// never affects the others. It closes ln before returning. It returns nil
// when stopped by ctx or Close.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	if err := s.check(); err != nil {
		return err
	}
	s.init()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.lns[ln] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.lns, ln)
		s.mu.Unlock()
	}()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	stopBase := context.AfterFunc(s.base, cancel)
	defer stopBase()

	log := s.logger()
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				// Stopped by ctx, Close, or whoever owns ln.
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				// Out of descriptors: back off rather than spin.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				log.Warn("nbd: accept", "err", err, "retry_in", delay)
				select {
				case <-time.After(delay):
					continue
				case <-ctx.Done():
					return nil
				}
			}
			ln.Close()
			return fmt.Errorf("nbd: accept: %w", err)
		}
		delay = 0
		if !s.track() {
			c.Close()
			return nil
		}
		go func() {
			defer s.conns.Done()
			if err := s.serveConn(ctx, c); err != nil {
				log.Debug("nbd: connection ended", "remote", c.RemoteAddr(), "err", err)
			}
		}()
	}
}

// ServeConn serves one connection until the client disconnects, ctx is
// done or Close is called, and closes c. It returns nil after a clean
// disconnect (NBD_CMD_DISC, NBD_OPT_ABORT) or a shutdown.
func (s *Server) ServeConn(ctx context.Context, c net.Conn) error {
	if err := s.check(); err != nil {
		c.Close()
		return err
	}
	s.init()
	if !s.track() {
		c.Close()
		return ErrServerClosed
	}
	defer s.conns.Done()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(s.base, cancel)()
	return s.serveConn(ctx, c)
}

// track counts one more connection for Close to wait for, unless the
// server is closed. The check and the Add share the lock so Close never
// waits on a group that is still growing.
func (s *Server) track() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns.Add(1)
	return true
}

func (s *Server) check() error {
	if s.Export.Backend == nil {
		return errors.New("nbd: Export.Backend is nil")
	}
	if c := s.TLSConfig; c != nil && len(c.Certificates) == 0 && c.GetCertificate == nil && c.GetConfigForClient == nil {
		return errors.New("nbd: TLSConfig has no server certificate")
	}
	return nil
}

// Close stops accepting, lets every connection finish the requests it has
// in flight (at most ShutdownGrace for clients that stopped reading), then
// closes them all and returns.
func (s *Server) Close() error {
	s.init()
	s.mu.Lock()
	s.closed = true
	for ln := range s.lns {
		ln.Close()
	}
	s.mu.Unlock()
	s.cancel()
	s.conns.Wait()
	return nil
}

// serveConn runs one connection: handshake, then transmission.
func (s *Server) serveConn(ctx context.Context, nc net.Conn) error {
	// rw is what NBD is spoken over: nc, or the TLS session on top of
	// it after STARTTLS. Closing the TLS session sends close_notify, as
	// proto.md asks of a server ending a TLS connection.
	var rw net.Conn = nc
	defer func() { rw.Close() }()
	growSendBuffer(nc)
	s.stats.connections.Add(1)
	s.stats.active.Add(1)
	defer s.stats.active.Add(-1)
	log := s.logger()

	// A done ctx unblocks whatever read the connection is in; the
	// transmission loop then drains what it has in flight. Deadlines go
	// on nc: a TLS session passes its own to nc anyway.
	stop := context.AfterFunc(ctx, func() {
		nc.SetReadDeadline(time.Unix(1, 0))
		grace := s.ShutdownGrace
		if grace <= 0 {
			grace = 10 * time.Second
		}
		nc.SetWriteDeadline(time.Now().Add(grace))
	})
	defer stop()

	hs := s.HandshakeTimeout
	if hs <= 0 {
		hs = 60 * time.Second
	}
	nc.SetDeadline(time.Now().Add(hs))
	br := bufio.NewReaderSize(nc, 128<<10)
	n := &negotiator{s: s, r: br, w: bufio.NewWriterSize(nc, 4096)}
	if s.TLSConfig != nil {
		n.tlsRequired = true
		n.startTLS = func() error {
			// Read through br: it may already hold the ClientHello.
			tc := tls.Server(bufferedConn{Conn: nc, r: br}, s.TLSConfig)
			if err := tc.HandshakeContext(ctx); err != nil {
				return fmt.Errorf("%w: TLS handshake failed: %w", ErrProtocol, err)
			}
			rw = tc
			br = bufio.NewReaderSize(tc, 128<<10)
			n.r, n.w = br, bufio.NewWriterSize(tc, 4096)
			return nil
		}
	}
	sess, err := n.negotiate()
	if err != nil {
		switch {
		case errors.Is(err, errAborted):
			return nil
		case ctx.Err() != nil:
			return nil
		case errors.Is(err, ErrProtocol):
			s.stats.dropped.Add(1)
			log.Warn("nbd: dropping client in handshake", "remote", nc.RemoteAddr(), "err", err)
		}
		return err
	}
	if err := n.w.Flush(); err != nil {
		return err
	}
	if ctx.Err() != nil {
		return nil
	}
	// Clear the handshake deadline unless a shutdown already set one.
	nc.SetDeadline(time.Time{})
	if ctx.Err() != nil {
		nc.SetReadDeadline(time.Unix(1, 0))
	}
	c := newConn(s, rw, br, sess)
	err = c.serve(ctx)
	if ctx.Err() != nil && err != nil && isTimeout(err) {
		err = nil
	}
	if errors.Is(err, ErrProtocol) {
		s.stats.dropped.Add(1)
		log.Warn("nbd: dropping client", "remote", nc.RemoteAddr(), "err", err)
	}
	return err
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout() || errors.Is(err, os.ErrDeadlineExceeded)
}

// errno maps a backend error to the NBD error the client sees.
func errno(err error) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, image.ErrOutOfRange):
		return nbdwire.ErrnoInval
	case errors.Is(err, image.ErrReadOnly), errors.Is(err, syscall.EROFS), errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EACCES):
		return nbdwire.ErrnoPerm
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return nbdwire.ErrnoNoSpace
	case errors.Is(err, syscall.ENOMEM):
		return nbdwire.ErrnoNoMem
	case errors.Is(err, errors.ErrUnsupported), errors.Is(err, syscall.EOPNOTSUPP):
		return nbdwire.ErrnoNotSup
	case errors.Is(err, syscall.EOVERFLOW):
		return nbdwire.ErrnoOverflow
	}
	return nbdwire.ErrnoIO
}

// unixSendBuffer is the send buffer a unix-socket connection asks for:
// room for a 1 MiB reply in one skb (a unix stream socket puts at most
// half its send buffer in one). With the default 208 KiB a 1 MiB reply
// went out in five pieces, the server sleeping until the client had read
// each: 9.3 context switches per read-1m-qd8 request against 1.8 (and
// 2,144-2,400 IOPS against 3,171-3,659, three alternating pairs of
// bench/profile.sh). It is a limit, not an allocation: the memory is
// used only while replies wait for a slow client.
const unixSendBuffer = 4 << 20

// growSendBuffer raises a unix socket's send buffer to unixSendBuffer:
// past the system's wmem_max where the process may (CAP_NET_ADMIN, as
// dom0's daemon has), else as far as wmem_max allows. TCP sizes its own.
func growSendBuffer(nc net.Conn) {
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		return
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return
	}
	raw.Control(func(fd uintptr) {
		if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, unixSendBuffer) != nil {
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF, unixSendBuffer)
		}
	})
}
