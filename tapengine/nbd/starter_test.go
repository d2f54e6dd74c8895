package nbd

import (
	"bytes"
	"errors"
	"sync"
	"syscall"
	"testing"
)

// starterBackend is a memBackend that also starts requests (Starter): a
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

func (s *starterBackend) Publish() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.held) > 0 {
		s.queue <- s.held
		s.held = nil
	}
	return nil
}

// TestStarterPath: with a RoundTrip Starter backend, aligned reads and
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
			if err := tc.send(Request{Type: CmdWrite, Cookie: uint64(i), Offset: uint64(i) * 64 << 10, Length: 64 << 10}, pat); err != nil {
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
		rep := mustOK(t)(tc.do(Request{Type: CmdRead, Cookie: 10, Offset: 64 << 10, Length: 64 << 10}, nil))
		got, err := rep.readData(64<<10, 64<<10)
		if err != nil || !bytes.Equal(got, pat) {
			t.Fatalf("read back (structured %v): %v", structured, err)
		}
		// A request whose part touches badOff fails whole.
		rep, err = tc.do(Request{Type: CmdRead, Cookie: 11, Offset: 500 << 10, Length: 64 << 10}, nil)
		if err != nil || rep.errno != errIO {
			t.Errorf("failing read: %v errno %d", err, rep.errno)
		}
		rep, err = tc.do(Request{Type: CmdWrite, Cookie: 12, Offset: 510 << 10, Length: 4096}, make([]byte, 4096))
		if err != nil || rep.errno != errIO {
			t.Errorf("failing write: %v errno %d", err, rep.errno)
		}
		be.mu.Lock()
		startedBefore := be.started
		be.mu.Unlock()
		// Unaligned and FUA go the blocking way, and still work.
		mustOK(t)(tc.do(Request{Type: CmdWrite, Cookie: 13, Offset: 700<<10 + 3, Length: 100}, pat[:100]))
		mustOK(t)(tc.do(Request{Type: CmdWrite, Flags: CmdFlagFUA, Cookie: 14, Offset: 800 << 10, Length: 4096}, pat[:4096]))
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
