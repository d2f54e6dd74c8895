package xenstore

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
)

// outQueueMax bounds the messages waiting for one connection's writer. A
// peer that stops reading while its watches keep firing is dropped rather
// than allowed to grow the server without bound.
const outQueueMax = 4096

// Server is an embedded xenstored: a State behind unix-socket (or
// in-process) connections. Every socket connection is domain 0. It is
// safe for concurrent use.
type Server struct {
	log *slog.Logger

	mu struct {
		sync.Mutex
		st     *State
		conns  map[ConnID]*serverConn
		lns    map[net.Listener]struct{}
		nextID ConnID
		closed bool
	}
	persist *persister // set by PersistTo; its fields are guarded by mu
	wg      sync.WaitGroup
}

// serverConn is one client connection. Replies to its own requests are
// written by its reader goroutine once a batch of requests is handled (no
// hand-off on the request path); watch events fired by other connections
// are queued and written by its writer goroutine, so a slow peer never
// stalls another connection's reader.
type serverConn struct {
	id    ConnID
	domid uint32
	c     net.Conn
	kick  chan struct{} // wakes the writer goroutine; capacity 1
	done  chan struct{}
	once  sync.Once

	wmu      sync.Mutex
	pending  []byte // encoded messages not yet written
	npending int
	spare    []byte
	writing  bool // someone is in flush
}

// enqueue adds an encoded message; false means the queue is full.
func (sc *serverConn) enqueue(b []byte) bool {
	sc.wmu.Lock()
	defer sc.wmu.Unlock()
	if sc.npending >= outQueueMax {
		return false
	}
	sc.pending = append(sc.pending, b...)
	sc.npending++
	return true
}

// flush writes everything pending unless another goroutine already is
// (it will pick up what was queued before it re-checks under wmu).
func (sc *serverConn) flush() error {
	sc.wmu.Lock()
	if sc.writing {
		sc.wmu.Unlock()
		return nil
	}
	sc.writing = true
	for len(sc.pending) > 0 {
		buf := sc.pending
		sc.pending, sc.npending = sc.spare[:0], 0
		sc.wmu.Unlock()
		_, err := sc.c.Write(buf)
		sc.wmu.Lock()
		sc.spare = buf[:0]
		if err != nil {
			sc.writing = false
			sc.wmu.Unlock()
			return err
		}
	}
	sc.writing = false
	sc.wmu.Unlock()
	return nil
}

// ErrServerClosed is returned by Serve after Close.
var ErrServerClosed = errors.New("xenstore: server closed")

// NewServer returns a server with a fresh tree. logger may be nil.
func NewServer(logger *slog.Logger) *Server {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{log: logger}
	s.mu.st = NewState()
	s.mu.st.Logf = func(format string, args ...any) { logger.Info(fmt.Sprintf(format, args...)) }
	s.mu.conns = map[ConnID]*serverConn{}
	s.mu.lns = map[net.Listener]struct{}{}
	return s
}

// ListenAndServe listens on a unix socket at path (mode 0600), removing a
// stale socket left by a dead server, and serves it until Close.
func (s *Server) ListenAndServe(path string) error {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return fmt.Errorf("xenstore: %s exists and is not a socket", path)
		}
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return fmt.Errorf("xenstore: a server already listens on %s", path)
		}
		if err := os.Remove(path); err != nil {
			return fmt.Errorf("xenstore: removing stale socket: %w", err)
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return fmt.Errorf("xenstore: listen: %w", err)
	}
	// Dom0 rights go to whoever can connect: only the owner may.
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("xenstore: chmod socket: %w", err)
	}
	return s.Serve(ln)
}

// Serve accepts connections on ln, each as domain 0, until Close. It
// returns ErrServerClosed after Close, or the accept error.
func (s *Server) Serve(ln net.Listener) error { return s.ServeDomain(ln, 0) }

// ServeDomain is Serve with every connection bound to domain domid (a
// per-domain socket): permissions and quotas apply unless domid is 0.
func (s *Server) ServeDomain(ln net.Listener, domid uint32) error {
	s.mu.Lock()
	if s.mu.closed {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.mu.lns[ln] = struct{}{}
	s.mu.Unlock()
	for {
		c, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.mu.closed
			delete(s.mu.lns, ln)
			s.mu.Unlock()
			if closed {
				return ErrServerClosed
			}
			return fmt.Errorf("xenstore: accept: %w", err)
		}
		if err := s.serveConn(c, domid); err != nil {
			c.Close()
			return err
		}
	}
}

// ConnectDomain returns an in-process connection bound to domain domid:
// permissions and quotas apply to it as to that guest. Closing it ends the
// connection (its watches and transactions go away).
func (s *Server) ConnectDomain(domid uint32) (net.Conn, error) {
	a, b := net.Pipe()
	if err := s.serveConn(a, domid); err != nil {
		a.Close()
		b.Close()
		return nil, err
	}
	return b, nil
}

func (s *Server) serveConn(c net.Conn, domid uint32) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mu.closed {
		return ErrServerClosed
	}
	s.mu.nextID++
	sc := &serverConn{id: s.mu.nextID, domid: domid, c: c, kick: make(chan struct{}, 1), done: make(chan struct{})}
	s.mu.conns[sc.id] = sc
	s.mu.st.AddConn(sc.id, domid)
	s.wg.Add(2)
	go s.readLoop(sc)
	go s.writeLoop(sc)
	s.log.Debug("xenstore connection", "conn", sc.id, "domid", domid)
	return nil
}

func (s *Server) drop(sc *serverConn, why error) {
	sc.once.Do(func() {
		close(sc.done)
		sc.c.Close()
		s.mu.Lock()
		delete(s.mu.conns, sc.id)
		s.mu.st.RemoveConn(sc.id)
		s.mu.Unlock()
		if why != nil && !errors.Is(why, io.EOF) && !errors.Is(why, net.ErrClosed) {
			s.log.Warn("xenstore connection dropped", "conn", sc.id, "domid", sc.domid, "err", why)
		}
	})
}

func (s *Server) readLoop(sc *serverConn) {
	defer s.wg.Done()
	var dec Decoder
	buf := make([]byte, 64*1024)
	for {
		n, err := sc.c.Read(buf)
		dec.Feed(buf[:n])
		for {
			m, ok, derr := dec.Next()
			if derr != nil {
				s.drop(sc, derr)
				return
			}
			if !ok {
				break
			}
			s.dispatch(sc, m)
		}
		// One write for the replies to everything this read brought.
		if ferr := sc.flush(); ferr != nil {
			s.drop(sc, ferr)
			return
		}
		if err != nil {
			s.drop(sc, err)
			return
		}
	}
}

// dispatch runs one request through the State and queues what it says to
// send. Queueing never blocks: a connection whose queue is full is dropped.
// Other connections' writers are woken; the caller flushes its own.
func (s *Server) dispatch(sc *serverConn, m Message) {
	s.mu.Lock()
	outs := s.mu.st.Handle(sc.id, m)
	s.noteChangeLocked()
	var victims, woken []*serverConn
	for _, o := range outs {
		dst := s.mu.conns[o.Conn]
		if dst == nil {
			continue
		}
		b, err := o.Msg.Append(nil)
		if err != nil {
			s.log.Error("xenstore reply too big", "op", o.Msg.Type, "err", err)
			b, _ = (&Message{Type: OpError, ReqID: o.Msg.ReqID, TxID: o.Msg.TxID, Payload: errorPayload(ErrTooBig)}).Append(nil)
		}
		if !dst.enqueue(b) {
			victims = append(victims, dst)
		} else if dst != sc {
			woken = append(woken, dst)
		}
	}
	s.mu.Unlock()
	for _, w := range woken {
		select {
		case w.kick <- struct{}{}:
		default:
		}
	}
	for _, v := range victims {
		s.drop(v, errors.New("output queue full (peer not reading)"))
	}
}

func (s *Server) writeLoop(sc *serverConn) {
	defer s.wg.Done()
	for {
		select {
		case <-sc.kick:
			if err := sc.flush(); err != nil {
				s.drop(sc, err)
				return
			}
		case <-sc.done:
			return
		}
	}
}

// Close stops every listener and closes every connection, then waits for
// the connection goroutines to finish.
func (s *Server) Close() error {
	s.mu.Lock()
	s.mu.closed = true
	for ln := range s.mu.lns {
		ln.Close()
	}
	conns := make([]*serverConn, 0, len(s.mu.conns))
	for _, c := range s.mu.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		s.drop(c, nil)
	}
	s.wg.Wait()
	s.mu.Lock()
	p := s.persist
	s.mu.Unlock()
	if p != nil {
		// The last changes are saved now, not after the delay.
		p.once.Do(func() { close(p.stop) })
		<-p.done
	}
	return nil
}

// Do runs fn on the server's State under its lock, for tests and for
// callers that need a consistent look at the tree. fn must not block.
func (s *Server) Do(fn func(st *State)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fn(s.mu.st)
	s.noteChangeLocked()
}
