package worker

import (
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/tapengine/nbd"
)

// startedIO is the export's backend for an image that starts calls
// (image.Starter: rbd on librbd's aio). As an nbd.AsyncBackend it lets
// the export's reader start each aligned READ and WRITE itself, and the
// image's completion goroutine answer it. The plain backend handed every
// request to one of the connection's goroutines, which waited in
// ReadAt or WriteAt and was woken again when librbd was done: two
// hand-offs per request, and a parked goroutine per request in flight.
//
// QoS and pause hold as for every other call: a start waits for the
// throttle on the reader, and the gate's read side is held from the start
// to the completion, so pause waits for started calls too. When the image
// behind the gate cannot start calls (a resume installed one that
// cannot), a start runs the call synchronously instead.
//
// The image's completions do not answer the export themselves: answering
// writes to a client's socket, which blocks while that client does not
// read, and rbd's one completion goroutine also completes the disk's
// other calls (the guest's ring, flushes). So Complete releases the gate,
// queues the call and returns; CompleteBatch wakes the answerer, one
// goroutine per export, which answers the queued calls and ends each
// Completer's batch. A client that stops reading holds up the replies of
// this export's connections, never the image.
//
// It lends no buffers (TakeTag fails): the export reads a WRITE's payload
// into a buffer of its own, which the image writes from, and copies a
// READ's data out of ours.
type startedIO struct {
	*throttle
	gate *gate

	mu    sync.Mutex
	calls []*startedCall // by tag: a call's tag is its index
	free  []uint64       // tags not in use

	doneMu sync.Mutex
	done   []startedDone // completed calls the answerer has not taken
	wake   chan struct{} // (room for one) done has calls
}

// newStartedIO serves the image behind g, through t, and starts the
// answerer, which lives as long as the worker.
func newStartedIO(t *throttle, g *gate) *startedIO {
	s := &startedIO{throttle: t, gate: g, wake: make(chan struct{}, 1)}
	go s.answer()
	return s
}

// startedDone is one completion, queued for the answerer.
type startedDone struct {
	tag uint64
	err error
}

var (
	_ nbd.AsyncBackend = (*startedIO)(nil)
	_ image.Completer  = (*startedIO)(nil)
)

// startedCall is one call in flight.
type startedCall struct {
	c      nbd.Completer
	cookie uint64
	op     int
	t0     time.Time
	buf    []byte  // a READ's buffer
	bufp   *[]byte // its pooled backing, nil if none
}

// startable reports whether the export should serve img through
// startedIO.
func startable(img image.Image) bool {
	s, ok := img.(image.Starter)
	return ok && s.Starts()
}

// errNoTags is TakeTag's answer: startedIO lends no buffers.
var errNoTags = errors.New("worker: the image lends no buffers")

// readBufMax: reads up to this size take a pooled buffer. The export
// starts only reads under 64 KiB (a longer one asks the map first) when
// its client takes structured replies.
const readBufMax = 64 << 10

var readBufs = sync.Pool{New: func() any { b := make([]byte, readBufMax); return &b }}

// StartMax is the longest part the export starts: a whole payload, in
// one call (librbd splits it by object itself).
func (s *startedIO) StartMax() int { return nbd.MaxPayload }

// StartRead starts reading n bytes at off for c.
func (s *startedIO) StartRead(off int64, n int, c nbd.Completer, cookie uint64) error {
	return s.start(opRead, nil, off, n, c, cookie)
}

// StartWrite starts writing p at off for c; p is the export's until c
// hears of it.
func (s *startedIO) StartWrite(p []byte, off int64, c nbd.Completer, cookie uint64) error {
	return s.start(opWrite, p, off, len(p), c, cookie)
}

func (s *startedIO) start(op int, p []byte, off int64, n int, c nbd.Completer, cookie uint64) error {
	s.wait(n)
	tag, call := s.take()
	call.c, call.cookie, call.op = c, cookie, op
	if op == opRead {
		if n <= readBufMax {
			call.bufp = readBufs.Get().(*[]byte)
			call.buf = (*call.bufp)[:n]
		} else {
			call.buf = make([]byte, n)
		}
		p = call.buf
	}
	call.t0 = s.meter.start()
	started, err := s.gate.start(op == opWrite, p, off, s, tag)
	switch {
	case started && err == nil:
		return nil
	case started: // nothing runs, and c hears nothing
		s.meter.end(op, call.t0)
		s.put(tag, call)
		return err
	}
	// The image behind the gate cannot start calls: run this one here.
	if op == opRead {
		_, err = s.gate.ReadAt(p, off)
	} else {
		_, err = s.gate.WriteAt(p, off)
	}
	s.finish(tag, err)
	return nil
}

// Complete takes a started call's completion (image.Completer), on the
// image's completion goroutine; cookie is the call's tag. The call no
// longer holds the gate; the answerer answers it.
func (s *startedIO) Complete(tag uint64, _ []byte, err error) {
	s.gate.done()
	s.doneMu.Lock()
	s.done = append(s.done, startedDone{tag, err})
	s.doneMu.Unlock()
}

// CompleteBatch wakes the answerer for the batch Complete queued.
func (s *startedIO) CompleteBatch() {
	select {
	case s.wake <- struct{}{}:
	default: // it is awake already, and will look again
	}
}

// answer answers the calls Complete queued, a batch at a time, and ends
// each batch with one CompleteBatch per Completer in it. It runs for the
// life of the worker, as the export does.
func (s *startedIO) answer() {
	var batch []startedDone
	var sinks []nbd.Completer
	for range s.wake {
		s.doneMu.Lock()
		batch, s.done = s.done, batch[:0]
		s.doneMu.Unlock()
		for _, d := range batch {
			if c := s.finish(d.tag, d.err); !slices.Contains(sinks, c) {
				sinks = append(sinks, c)
			}
		}
		clear(batch)
		for _, c := range sinks {
			c.CompleteBatch()
		}
		clear(sinks)
		sinks = sinks[:0]
	}
}

// finish answers the call on tag with err and returns its Completer.
func (s *startedIO) finish(tag uint64, err error) nbd.Completer {
	s.mu.Lock()
	call := s.calls[tag]
	s.mu.Unlock()
	s.meter.end(call.op, call.t0)
	var data []byte
	if call.op == opRead && err == nil {
		data = call.buf
	}
	c := call.c
	c.Complete(call.cookie, data, err) // copies a read's data
	s.put(tag, call)
	return c
}

// take returns a free tag and its call.
func (s *startedIO) take() (uint64, *startedCall) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if k := len(s.free); k > 0 {
		tag := s.free[k-1]
		s.free = s.free[:k-1]
		return tag, s.calls[tag]
	}
	s.calls = append(s.calls, new(startedCall))
	return uint64(len(s.calls) - 1), s.calls[len(s.calls)-1]
}

// put frees tag, giving back the call's read buffer.
func (s *startedIO) put(tag uint64, call *startedCall) {
	if call.bufp != nil {
		readBufs.Put(call.bufp)
	}
	call.c, call.buf, call.bufp = nil, nil, nil
	s.mu.Lock()
	s.free = append(s.free, tag)
	s.mu.Unlock()
}

// TakeTag lends no buffer (see startedIO).
func (s *startedIO) TakeTag() (uint64, []byte, error) { return 0, nil, errNoTags }

// PutTag is never called: no tag is ever taken.
func (s *startedIO) PutTag(uint64) {}

// StartTagRead is never called: no tag is ever taken.
func (s *startedIO) StartTagRead(uint64, int64, int, nbd.Completer, uint64) error { return errNoTags }

// StartTagWrite is never called: no tag is ever taken.
func (s *startedIO) StartTagWrite(uint64, int64, int, nbd.Completer, uint64) error {
	return errNoTags
}

// Publish has nothing to do: every call starts at once.
func (s *startedIO) Publish() error { return nil }

// Poll finds nothing: completions come on the image's goroutine only.
func (s *startedIO) Poll(time.Duration) bool { return false }
