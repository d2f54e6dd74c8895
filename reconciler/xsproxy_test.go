package reconciler

import (
	"bytes"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/blktap-go/blktap/xenstore"
)

// xsProxy stands between the daemon under test and the in-process
// xenstored, and injects faults into the daemon's side of the
// conversation only (the test's own client, playing the toolstack and the
// guest, talks to the xenstored directly):
//
//   - commits answered EAGAIN: the proxy turns the commit into an abort
//     on its way to the server and the server's OK into EAGAIN on its way
//     back, so nothing of the transaction lands, as with a real conflict;
//   - slow replies: every reply waits before it is passed on, in order,
//     as from a xenstored busy with other domains.
//
// It speaks the wire codec of the xenstore package and needs no hook in
// the client or the daemon.
type xsProxy struct {
	ln       net.Listener
	upstream string

	mu       sync.Mutex
	eagain   int // commits still to answer EAGAIN
	injected int // commits answered EAGAIN so far
	delay    time.Duration
	conns    []net.Conn
	requests int // messages the daemon sent
	events   int // watch events the daemon was sent
}

// counts reports the requests the daemon sent and the watch events it
// received so far.
func (p *xsProxy) counts() (requests, events int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.requests, p.events
}

func startXSProxy(t *testing.T, path, upstream string) *xsProxy {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	p := &xsProxy{ln: ln, upstream: upstream}
	go p.accept()
	t.Cleanup(p.close)
	return p
}

// failCommits makes the next n commits of the daemon's transactions fail
// with EAGAIN.
func (p *xsProxy) failCommits(n int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.eagain += n
}

// setDelay holds every reply back by d (0: none).
func (p *xsProxy) setDelay(d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.delay = d
}

// pending reports the EAGAINs armed and not yet injected, and how many
// were injected in all.
func (p *xsProxy) pending() (left, injected int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.eagain, p.injected
}

func (p *xsProxy) close() {
	p.ln.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
}

func (p *xsProxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("unix", p.upstream)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, c, s)
		p.mu.Unlock()
		failed := &reqSet{ids: map[uint32]bool{}}
		go p.pump(c, s, func(m xenstore.Message) xenstore.Message { return p.request(m, failed) })
		go p.pump(s, c, func(m xenstore.Message) xenstore.Message { return p.reply(m, failed) })
	}
}

// reqSet is the request ids of commits the proxy turned into aborts.
type reqSet struct {
	mu  sync.Mutex
	ids map[uint32]bool
}

func (p *xsProxy) request(m xenstore.Message, failed *reqSet) xenstore.Message {
	p.mu.Lock()
	p.requests++
	p.mu.Unlock()
	if m.Type != xenstore.OpTransactionEnd || !bytes.Equal(m.Payload, []byte("T\x00")) {
		return m
	}
	p.mu.Lock()
	fail := p.eagain > 0
	if fail {
		p.eagain--
		p.injected++
	}
	p.mu.Unlock()
	if !fail {
		return m
	}
	failed.mu.Lock()
	failed.ids[m.ReqID] = true
	failed.mu.Unlock()
	m.Payload = []byte("F\x00")
	return m
}

func (p *xsProxy) reply(m xenstore.Message, failed *reqSet) xenstore.Message {
	p.mu.Lock()
	delay := p.delay
	if m.Type == xenstore.OpWatchEvent {
		p.events++
	}
	p.mu.Unlock()
	if delay > 0 {
		time.Sleep(delay)
	}
	if m.Type != xenstore.OpTransactionEnd {
		return m
	}
	failed.mu.Lock()
	fail := failed.ids[m.ReqID]
	delete(failed.ids, m.ReqID)
	failed.mu.Unlock()
	if fail {
		m = xenstore.Message{Type: xenstore.OpError, ReqID: m.ReqID, TxID: m.TxID, Payload: []byte("EAGAIN\x00")}
	}
	return m
}

// pump copies messages from src to dst through edit, until either end
// closes.
func (p *xsProxy) pump(src, dst net.Conn, edit func(xenstore.Message) xenstore.Message) {
	defer src.Close()
	defer dst.Close()
	var dec xenstore.Decoder
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		dec.Feed(buf[:n])
		for {
			m, ok, derr := dec.Next()
			if derr != nil {
				return
			}
			if !ok {
				break
			}
			m = edit(m)
			b, _ := m.Append(nil)
			if _, werr := dst.Write(b); werr != nil {
				return
			}
		}
		if err != nil {
			return // EOF or closed: the other pump ends with it
		}
	}
}
