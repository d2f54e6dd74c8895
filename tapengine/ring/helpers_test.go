package ring

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/tapengine/blkif"
)

// memTransport is an in-process Transport: a page-aligned ring, a map of
// granted pages and two eventfds. Tests drive the frontend side by hand.
type memTransport struct {
	ring         []byte
	mu           sync.Mutex
	pages        map[uint32][]byte
	ro           map[uint32]bool
	kick, notify int
}

var errNotGranted = errors.New("not granted")

func newMemTransport(t testing.TB, order int) *memTransport {
	t.Helper()
	r, err := unix.Mmap(-1, 0, blkif.RingSize(order), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	kick, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	// Blocking, so a test can wait for a notification with a plain read.
	notify, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	m := &memTransport{ring: r, pages: map[uint32][]byte{}, ro: map[uint32]bool{}, kick: kick, notify: notify}
	t.Cleanup(func() {
		for _, p := range m.pages {
			unix.Munmap(p)
		}
		unix.Munmap(r)
		unix.Close(kick)
		unix.Close(notify)
	})
	return m
}

// grant makes a page for ref and returns the frontend's view of it.
func (m *memTransport) grant(ref uint32, readOnly bool) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	p, ok := m.pages[ref]
	if !ok {
		// Shared memory, as with a real transport: the ring's atomics and
		// eventfds order it, which the race detector cannot see on the heap.
		var err error
		p, err = unix.Mmap(-1, 0, blkif.PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			panic(err)
		}
		m.pages[ref] = p
	}
	m.ro[ref] = readOnly
	return p
}

func (m *memTransport) Ring() []byte { return m.ring }
func (m *memTransport) Page(ref uint32, writable bool) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	p, ok := m.pages[ref]
	if !ok {
		return nil, fmt.Errorf("%w: ref %d", errNotGranted, ref)
	}
	if writable && m.ro[ref] {
		return nil, fmt.Errorf("%w: ref %d read-only", errNotGranted, ref)
	}
	return p, nil
}
func (m *memTransport) WaitFD() int { return m.kick }
func (m *memTransport) Ack() error {
	var b [8]byte
	_, err := unix.Read(m.kick, b[:])
	if errors.Is(err, unix.EAGAIN) {
		return nil
	}
	return err
}
func (m *memTransport) Notify() error {
	_, err := unix.Write(m.notify, []byte{1, 0, 0, 0, 0, 0, 0, 0})
	return err
}
func (m *memTransport) Close() error { return nil }

// copyTransport is a memTransport that moves data as a Copier does (Xen's
// grant copy): Serve must never map one of its pages, and a copy refused
// for a grant fails with ErrBadGrant. It checks that the ring hands it
// segments within a page that add up to the buffer.
type copyTransport struct{ *memTransport }

func (c copyTransport) Copying() bool { return true }
func (c copyTransport) Page(ref uint32, _ bool) ([]byte, error) {
	panic(fmt.Sprintf("Page(%d) on a Copier", ref))
}
func (c copyTransport) CopyIn(segs []CopySeg, buf []byte) error  { return c.copy(segs, buf, false) }
func (c copyTransport) CopyOut(segs []CopySeg, buf []byte) error { return c.copy(segs, buf, true) }

func (c copyTransport) copy(segs []CopySeg, buf []byte, out bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, s := range segs {
		if s.Len == 0 || int(s.Off)+int(s.Len) > blkif.PageSize || int(s.Len) > len(buf) {
			panic(fmt.Sprintf("bad copy segment %+v for %d bytes left", s, len(buf)))
		}
		p, ok := c.pages[s.Ref]
		if !ok || out && c.ro[s.Ref] {
			return fmt.Errorf("%w: %w: ref %d", ErrBadGrant, errNotGranted, s.Ref)
		}
		if out {
			copy(p[s.Off:], buf[:s.Len])
		} else {
			copy(buf, p[s.Off:][:s.Len])
		}
		buf = buf[s.Len:]
	}
	if len(buf) != 0 {
		panic(fmt.Sprintf("copy segments short of the buffer by %d bytes", len(buf)))
	}
	return nil
}

func (m *memTransport) kickBackend() {
	if _, err := unix.Write(m.kick, []byte{1, 0, 0, 0, 0, 0, 0, 0}); err != nil {
		panic(err)
	}
}

func (m *memTransport) waitNotify() {
	var b [8]byte
	if _, err := unix.Read(m.notify, b[:]); err != nil {
		panic(err)
	}
}

// memImage is an in-memory image.Image.
type memImage struct {
	mu       sync.Mutex
	data     []byte
	flushes  int
	discards int
}

func (m *memImage) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := image.CheckRange(off, len(p), int64(len(m.data))); err != nil {
		return 0, err
	}
	return copy(p, m.data[off:]), nil
}
func (m *memImage) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := image.CheckRange(off, len(p), int64(len(m.data))); err != nil {
		return 0, err
	}
	return copy(m.data[off:], p), nil
}
func (m *memImage) Size() int64 { return int64(len(m.data)) }
func (m *memImage) Flush() error {
	m.mu.Lock()
	m.flushes++
	m.mu.Unlock()
	return nil
}
func (m *memImage) Discard(off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := image.CheckRange(off, int(n), int64(len(m.data))); err != nil {
		return err
	}
	clear(m.data[off : off+n])
	m.discards++
	return nil
}
func (m *memImage) Map(off, n int64) ([]image.Extent, error) {
	return []image.Extent{{Offset: off, Length: n}}, nil
}
func (m *memImage) Close() error { return nil }

// snapshot returns a copy of the data and the counters, under the lock.
func (m *memImage) snapshot() (data []byte, flushes, discards int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return bytes.Clone(m.data), m.flushes, m.discards
}

// harness runs Serve on a memTransport and drives the frontend half.
type harness struct {
	t     testing.TB
	tr    *memTransport
	front *Front
	img   *memImage
	stats *Stats
	done  chan error
	stop  context.CancelFunc
}

func newHarness(t testing.TB, proto blkif.Protocol, order int, size int, opts Options) *harness {
	t.Helper()
	mem := &memImage{data: make([]byte, size)}
	return newHarnessImage(t, proto, order, mem, mem, opts)
}

// newHarnessImage serves img, which keeps its data in mem.
func newHarnessImage(t testing.TB, proto blkif.Protocol, order int, mem *memImage, img image.Image, opts Options) *harness {
	t.Helper()
	tr := newMemTransport(t, order)
	front, err := NewFront(tr.ring, proto)
	if err != nil {
		t.Fatal(err)
	}
	front.Init()
	h := &harness{t: t, tr: tr, front: front, img: mem, stats: new(Stats), done: make(chan error, 1)}
	opts.Stats = h.stats
	ctx, cancel := context.WithCancel(context.Background())
	h.stop = cancel
	go func() { h.done <- Serve(ctx, tr, proto, img, opts) }()
	t.Cleanup(func() {
		if h.stop != nil {
			h.stop()
			<-h.done
		}
	})
	return h
}

// do pushes reqs, kicks if the ring says so, and collects one response
// per request (in the order they come).
func (h *harness) do(reqs ...blkif.Request) []blkif.Response {
	h.t.Helper()
	for i := range reqs {
		if err := h.front.Push(&reqs[i]); err != nil {
			h.t.Fatal(err)
		}
	}
	if h.front.PushRequests() {
		h.tr.kickBackend()
	}
	var out []blkif.Response
	for len(out) < len(reqs) {
		n, err := h.front.Pending()
		if err != nil {
			h.t.Fatal(err)
		}
		for range n {
			var r blkif.Response
			h.front.Next(&r)
			out = append(out, r)
		}
		if len(out) == len(reqs) {
			break
		}
		more, err := h.front.FinalCheck()
		if err != nil {
			h.t.Fatal(err)
		}
		if !more {
			h.tr.waitNotify()
		}
	}
	return out
}

func contextWithCancel() (context.Context, context.CancelFunc) {
	return context.WithCancel(context.Background())
}
