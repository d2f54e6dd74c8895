package nbd

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/nbdwire"
)

// starterBackend is a memBackend that also starts requests (AsyncBackend): a
// goroutine of its own completes them in batches, in reverse order, and
// fails every part that touches badOff.
type starterBackend struct {
	*memBackend
	max    int
	badOff int64

	mu      sync.Mutex
	held    []func()
	queue   chan []func()
	started int
}

func newStarter(size, max int, badOff int64) *starterBackend {
	s := &starterBackend{memBackend: newMem(size), max: max, badOff: badOff, queue: make(chan []func(), 1024)}
	go func() {
		for batch := range s.queue {
			for i := len(batch) - 1; i >= 0; i-- {
				batch[i]()
			}
		}
	}()
	return s
}

func (s *starterBackend) StartMax() int { return s.max }

func (s *starterBackend) start(off int64, n int, fn func() ([]byte, error), c Completer, cookie uint64) error {
	if n <= 0 || n > s.max || off%512 != 0 {
		return errors.New("bad start")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.started++
	s.held = append(s.held, func() {
		data, err := fn()
		if off <= s.badOff && s.badOff < off+int64(n) {
			data, err = nil, syscall.EIO
		}
		c.Complete(cookie, data, err)
		c.CompleteBatch()
	})
	return nil
}

func (s *starterBackend) StartRead(off int64, n int, c Completer, cookie uint64) error {
	return s.start(off, n, func() ([]byte, error) {
		b := make([]byte, n)
		_, err := s.ReadAt(b, off)
		return b, err
	}, c, cookie)
}

func (s *starterBackend) StartWrite(p []byte, off int64, c Completer, cookie uint64) error {
	p = bytes.Clone(p)
	return s.start(off, len(p), func() ([]byte, error) {
		_, err := s.WriteAt(p, off)
		return nil, err
	}, c, cookie)
}

// The starterBackend lends no buffers: TakeTag fails, as the frontend's
// does once it is closing, so every request is started on a buffer of
// the server's own.
var errNoTags = errors.New("starterBackend lends no buffers")

func (s *starterBackend) TakeTag() (uint64, []byte, error) { return 0, nil, errNoTags }

func (s *starterBackend) StartTagRead(uint64, int64, int, Completer, uint64) error { return errNoTags }

func (s *starterBackend) StartTagWrite(uint64, int64, int, Completer, uint64) error { return errNoTags }

func (s *starterBackend) PutTag(h uint64) { panic(fmt.Sprintf("PutTag(%d) of a tag never lent", h)) }

// Poll publishes and finds nothing: completions come from the backend's
// goroutine.
func (s *starterBackend) Poll(time.Duration) bool {
	_ = s.Publish()
	return false
}

var (
	_ AsyncBackend = (*starterBackend)(nil)
	_ AsyncBackend = (*lenderBackend)(nil)
)

func (s *starterBackend) Publish() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.held) > 0 {
		s.queue <- s.held
		s.held = nil
	}
	return nil
}

// TestStarterPath: with a RoundTrip AsyncBackend that lends no buffers, aligned reads and
// writes (one part or many) go through Start and come back right, the
// failing part fails its whole request with EIO (simple and structured
// replies), and unaligned or FUA requests take the blocking path.
func TestStarterPath(t *testing.T) {
	const size = 1 << 20
	for _, structured := range []bool{false, true} {
		be := newStarter(size, 4096, 512<<10)
		_, sock, _ := startServer(t, Export{Name: "disk", Backend: be, RoundTrip: true})
		tc := connected(t, sock, structured, false)
		pat := make([]byte, 64<<10)
		for i := range pat {
			pat[i] = byte(i*7 + i>>12)
		}
		// Several requests in flight at once, answered out of order.
		for i := range 4 {
			if err := tc.send(Request{Type: nbdwire.CmdWrite, Cookie: uint64(i), Offset: uint64(i) * 64 << 10, Length: 64 << 10}, pat); err != nil {
				t.Fatal(err)
			}
		}
		for range 4 {
			if rep, err := tc.recv(); err != nil || rep.errno != 0 {
				t.Fatalf("write: %v %+v", err, rep)
			}
		}
		be.mu.Lock()
		if be.started != 4*16 {
			t.Errorf("%d parts started for 4 writes of 16 pages", be.started)
		}
		be.mu.Unlock()
		be.memBackend.mu.RLock()
		landed := bytes.Equal(be.data[3*64<<10:4*64<<10], pat)
		be.memBackend.mu.RUnlock()
		if !landed {
			t.Fatal("write did not reach the backend")
		}
		rep := mustOK(t)(tc.do(Request{Type: nbdwire.CmdRead, Cookie: 10, Offset: 64 << 10, Length: 64 << 10}, nil))
		got, err := rep.readData(64<<10, 64<<10)
		if err != nil || !bytes.Equal(got, pat) {
			t.Fatalf("read back (structured %v): %v", structured, err)
		}
		// A request whose part touches badOff fails whole.
		rep, err = tc.do(Request{Type: nbdwire.CmdRead, Cookie: 11, Offset: 500 << 10, Length: 64 << 10}, nil)
		if err != nil || rep.errno != nbdwire.ErrnoIO {
			t.Errorf("failing read: %v errno %d", err, rep.errno)
		}
		rep, err = tc.do(Request{Type: nbdwire.CmdWrite, Cookie: 12, Offset: 510 << 10, Length: 4096}, make([]byte, 4096))
		if err != nil || rep.errno != nbdwire.ErrnoIO {
			t.Errorf("failing write: %v errno %d", err, rep.errno)
		}
		be.mu.Lock()
		startedBefore := be.started
		be.mu.Unlock()
		// Unaligned and FUA go the blocking way, and still work.
		mustOK(t)(tc.do(Request{Type: nbdwire.CmdWrite, Cookie: 13, Offset: 700<<10 + 3, Length: 100}, pat[:100]))
		mustOK(t)(tc.do(Request{Type: nbdwire.CmdWrite, Flags: nbdwire.CmdFlagFUA, Cookie: 14, Offset: 800 << 10, Length: 4096}, pat[:4096]))
		be.mu.Lock()
		if be.started != startedBefore {
			t.Errorf("unaligned or FUA write was started (%d -> %d)", startedBefore, be.started)
		}
		be.mu.Unlock()
		be.memBackend.mu.Lock()
		if !bytes.Equal(be.data[700<<10+3:700<<10+103], pat[:100]) || be.flushes == 0 {
			t.Error("blocking path lost a write or the FUA flush")
		}
		be.memBackend.mu.Unlock()
	}
}

// lenderBackend is a starterBackend that lends a fixed set of buffers
// (TakeTag), checking that every one comes back and none is used twice.
type lenderBackend struct {
	*starterBackend
	free chan uint64
	bufs [][]byte
	out  []bool // guarded by starterBackend.mu
}

func newLender(size, max, n int, badOff int64) *lenderBackend {
	l := &lenderBackend{starterBackend: newStarter(size, max, badOff), free: make(chan uint64, n), out: make([]bool, n)}
	for i := range n {
		l.bufs = append(l.bufs, make([]byte, max))
		l.free <- uint64(i)
	}
	return l
}

func (l *lenderBackend) TakeTag() (uint64, []byte, error) {
	var h uint64
	select {
	case h = <-l.free:
	default:
		l.Publish() // what it holds back is what frees buffers
		h = <-l.free
	}
	l.mu.Lock()
	l.out[h] = true
	l.mu.Unlock()
	return h, l.bufs[h], nil
}

func (l *lenderBackend) PutTag(h uint64) {
	l.mu.Lock()
	if !l.out[h] {
		panic(fmt.Sprintf("tag %d put back twice", h))
	}
	l.out[h] = false
	l.mu.Unlock()
	l.free <- h
}

func (l *lenderBackend) lentOut() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, o := range l.out {
		if o {
			n++
		}
	}
	return n
}

func (l *lenderBackend) StartTagRead(h uint64, off int64, n int, c Completer, cookie uint64) error {
	buf := l.bufs[h][:n]
	return l.start(off, n, func() ([]byte, error) {
		_, err := l.ReadAt(buf, off)
		return buf, err
	}, c, cookie)
}

func (l *lenderBackend) StartTagWrite(h uint64, off int64, n int, c Completer, cookie uint64) error {
	p := bytes.Clone(l.bufs[h][:n]) // the server may reuse the tag once it completes
	return l.start(off, n, func() ([]byte, error) {
		_, err := l.WriteAt(p, off)
		return nil, err
	}, c, cookie)
}

// TestLenderPath: reads and writes started on lent buffers (one part and
// several) come back right in both reply styles, a failing part fails its
// request, a request of more parts than a lender may hold is copied, and
// every buffer is back once the replies are out.
func TestLenderPath(t *testing.T) {
	const size = 1 << 20
	for _, structured := range []bool{false, true} {
		be := newLender(size, 4096, 8, 512<<10)
		_, sock, _ := startServer(t, Export{Name: "disk", Backend: be, RoundTrip: true})
		tc := connected(t, sock, structured, false)
		pat := make([]byte, 64<<10)
		for i := range pat {
			pat[i] = byte(i*13 + i>>11)
		}
		// 4 pages: lent; 16 pages: copied.
		for i, n := range []int{4096, 16384, 65536} {
			mustOK(t)(tc.do(Request{Type: nbdwire.CmdWrite, Cookie: uint64(i), Offset: uint64(i) << 16, Length: uint64(n)}, pat[:n]))
			rep := mustOK(t)(tc.do(Request{Type: nbdwire.CmdRead, Cookie: 10 + uint64(i), Offset: uint64(i) << 16, Length: uint64(n)}, nil))
			got, err := rep.readData(uint64(i)<<16, uint64(n))
			if err != nil || !bytes.Equal(got, pat[:n]) {
				t.Fatalf("%d bytes (structured %v): %v", n, structured, err)
			}
		}
		// Many at once: more requests than buffers.
		for i := range 16 {
			tc.send(Request{Type: nbdwire.CmdRead, Cookie: 100 + uint64(i), Offset: uint64(i%3) << 16, Length: 8192}, nil)
		}
		for range 16 {
			rep, err := tc.recv()
			if err != nil || rep.errno != 0 {
				t.Fatalf("read: %v %+v", err, rep)
			}
		}
		rep, err := tc.do(Request{Type: nbdwire.CmdRead, Cookie: 200, Offset: 510 << 10, Length: 8192}, nil)
		if err != nil || rep.errno != nbdwire.ErrnoIO {
			t.Errorf("failing lent read: %v errno %d", err, rep.errno)
		}
		rep, err = tc.do(Request{Type: nbdwire.CmdWrite, Cookie: 201, Offset: 510 << 10, Length: 8192}, make([]byte, 8192))
		if err != nil || rep.errno != nbdwire.ErrnoIO {
			t.Errorf("failing lent write: %v errno %d", err, rep.errno)
		}
		// A refused write (past the end) gives its buffers back too.
		tc.send(Request{Type: nbdwire.CmdWrite, Cookie: 202, Offset: size - 4096, Length: 8192}, make([]byte, 8192))
		if rep, err := tc.recv(); err != nil || rep.errno == 0 {
			t.Errorf("write past the end: %v %+v", err, rep)
		}
		// The server gives a buffer back just after its reply is sent,
		// so the client may be a moment ahead.
		deadline := time.Now().Add(10 * time.Second)
		for be.lentOut() != 0 && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		if n := be.lentOut(); n != 0 {
			t.Errorf("%d buffers still lent after every reply", n)
		}
	}
}
