package nbd

import (
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/blktap-go/blktap/internal/nbdwire"
)

// readLoop reads requests and their payloads and runs, starts or queues
// them. It returns nil on NBD_CMD_DISC or a clean hang-up between
// requests.
//
// Small reads (and block status, cache) run right here, with their
// replies held back until no complete request is left in the read
// buffer; then one writev sends them all. That is the lesson measured in
// docs/PERFORMANCE.md ("Session 2"): hand-offs and wake-ups, not copies,
// bound a block server on these machines. Everything that may block for long (writes, flush,
// trim, zeroing, big transfers) goes to the workers, and so does
// everything after an inline request turned out slow (a page-cache miss
// on a real disk), so one slow disk read does not serialise the queue.
// On an async backend aligned reads and writes are started here and
// answered by the backend's goroutine.
func (c *conn) readLoop() error {
	headerSize := nbdwire.RequestHeaderSize(c.sess.extended)
	// Replies and started requests held back must go out whatever ends
	// the loop.
	defer c.flushHeld()
	var header [nbdwire.ExtRequestSize]byte
	var depth queueDepth
	for {
		if c.br.Buffered() < headerSize {
			// About to wait for the client: send what we have.
			c.eng.idle(depth.waiting(c.started.Load()))
		}
		depth.read()
		if _, err := io.ReadFull(c.br, header[:headerSize]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("nbd: reading request: %w", err)
		}
		// The codec directly, not through ParseRequest: one call fewer per
		// request (the wrapper cost 3.6 ns, +42%, on a quiet machine).
		rq, err := nbdwire.ParseRequest(header[:headerSize], c.sess.extended)
		if err != nil {
			return protocolError(err)
		}
		if rq.Type == nbdwire.CmdDisc {
			return c.checkDisc(rq)
		}
		c.s.Bell.Ring()
		r, err := c.readRequest(rq)
		if err != nil {
			return err
		}
		if r != nil { // nil: streamed, and answered already
			c.eng.start(r)
		}
	}
}

// queueDepth tells a client that waits for every answer (one request
// read, with nothing else in flight, qd1Streak times in a row) from a
// deeper queue, which passes through depth 1 now and then. Reader only.
type queueDepth struct {
	run    int // requests read since the read buffer was last empty
	streak int // times in a row that was one request, alone in flight
}

func (q *queueDepth) read() { q.run++ }

// waiting is called when the reader is about to wait for its client; it
// reports whether the client is at queue depth 1.
func (q *queueDepth) waiting(started int32) bool {
	if q.run == 1 && started == 1 {
		q.streak++
	} else {
		q.streak = 0
	}
	q.run = 0
	return q.streak >= qd1Streak
}

// payloadLen is the length of the payload that follows rq's header.
func (c *conn) payloadLen(rq Request) uint64 {
	if rq.Type == nbdwire.CmdWrite || (c.sess.extended && rq.Flags&nbdwire.CmdFlagPayloadLen != 0) {
		return rq.Length
	}
	return 0
}

// checkDisc ends the loop on NBD_CMD_DISC, unless a payload it announces
// would leave the stream out of frame (then that is the error).
func (c *conn) checkDisc(rq Request) error {
	if plen := c.payloadLen(rq); plen > MaxStreamed {
		return fmt.Errorf("%w: payload of %d bytes exceeds %d", ErrProtocol, plen, MaxStreamed)
	}
	return nil
}

// readRequest takes a free slot for rq, draws its memory from the budget
// and reads its payload. A WRITE above MaxPayload is streamed to the
// backend and answered here; then it returns a nil req.
func (c *conn) readRequest(rq Request) (*req, error) {
	plen := c.payloadLen(rq)
	if plen > MaxStreamed {
		// Its payload would follow; we will not read it, and without
		// it the stream is out of frame.
		return nil, fmt.Errorf("%w: payload of %d bytes exceeds %d", ErrProtocol, plen, MaxStreamed)
	}
	if len(c.free) == 0 {
		c.flushHeld() // what we hold may be what frees a slot
	}
	r := <-c.free
	r.Request = rq
	need := int64(plen)
	if plen > 0 && c.refused(rq) || plen > MaxPayload {
		need = 0 // its payload is dropped, or streamed, as it is read
	}
	if plen == 0 && rq.Type == nbdwire.CmdRead && rq.Length <= MaxPayload {
		need = int64(rq.Length)
	}
	if need > bigRequest {
		c.flushHeld()
		c.acquire(r, need)
	}
	if plen > MaxPayload && !c.refused(rq) {
		c.flushHeld()
		return nil, c.streamWrite(r)
	}
	if plen > 0 {
		if c.br.Buffered() < int(plen) {
			c.flushHeld()
		}
		if err := c.readPayload(r, plen); err != nil {
			c.release(r)
			return nil, fmt.Errorf("nbd: reading %d-byte payload: %w", plen, err)
		}
	}
	return r, nil
}

// runOrQueue runs r here or queues it for a worker: the engines' way
// with every request they do not start on the backend.
func (c *conn) runOrQueue(r *req) {
	if c.inlineable(r.Request) {
		c.runInline(r)
	} else {
		c.work <- r
	}
}

// flushHeld sends the replies the reader held back and publishes the
// requests it started.
func (c *conn) flushHeld() { c.eng.flush() }

// inlineable reports whether the reader should run rq itself.
func (c *conn) inlineable(rq Request) bool {
	if c.s.Export.RoundTrip && c.br.Buffered() > 0 {
		return false // more requests are here: keep them all in flight
	}
	if c.inlineOff > 0 {
		c.inlineOff--
		return false
	}
	switch rq.Type {
	case nbdwire.CmdRead, nbdwire.CmdCache, nbdwire.CmdBlockStatus:
		return rq.Length <= inlineMax
	case nbdwire.CmdWrite:
		// With InlineWrites a page-cache write is cheaper here than a
		// hand-off: buffered writes to one file serialise on its inode
		// lock anyway, so workers add wake-ups, not parallelism
		// (bench/profile.sh ours-dom0 randwrite-4k-qd32: 6.5-7.1 us and
		// 0.05-0.12 switches per write inline, 9.1-10.3 us and 0.16 on
		// the workers). A slow one (runInline) sends the next requests to
		// the workers for a while. Up to 1 MiB: the payload the reader
		// just read is still in its CPU's cache, where a worker on the
		// other CPU would copy it into the page cache from afar
		// (write-1m-qd8: 265-296 us of CPU and 2.5-3.1 switches per
		// write inline, 350-359 us and 7.8-8.0 on the workers).
		return c.s.Export.InlineWrites && rq.Flags&nbdwire.CmdFlagFUA == 0 && rq.Length <= inlineWriteMax
	}
	return false
}

// runInline runs r on the reader goroutine with its reply held back, and
// turns inlining off for a while if it was slow.
func (c *conn) runInline(r *req) {
	// A big write takes longer in the page cache too: its limit grows
	// with it.
	limit := slowInline * time.Duration(max(1, r.Length/inlineMax))
	start := time.Now()
	r.holdReply = true
	c.handle(r)
	if time.Since(start) > limit {
		c.inlineOff = inlinePause
	}
}

// allowed flags per command; anything else is EINVAL.
func (c *conn) allowedFlags(typ uint16) uint16 {
	var f uint16
	switch typ {
	case nbdwire.CmdRead:
		f = nbdwire.CmdFlagDF
	case nbdwire.CmdWrite:
		f = nbdwire.CmdFlagFUA
	case nbdwire.CmdTrim:
		f = nbdwire.CmdFlagFUA
	case nbdwire.CmdWriteZeroes:
		f = nbdwire.CmdFlagFUA | nbdwire.CmdFlagNoHole | nbdwire.CmdFlagFastZero
	case nbdwire.CmdBlockStatus:
		f = nbdwire.CmdFlagReqOne
	}
	if c.sess.extended && typ == nbdwire.CmdWrite {
		f |= nbdwire.CmdFlagPayloadLen
	}
	// Clients may set FUA on any command; it only matters for writes.
	return f | nbdwire.CmdFlagFUA
}

// refused reports whether handle answers a request that carries a
// payload with an error, whatever the backend would say.
func (c *conn) refused(rq Request) bool {
	return rq.Type != nbdwire.CmdWrite || rq.Flags&^c.allowedFlags(rq.Type) != 0 || c.ro || !c.inRange(rq.Offset, rq.Length)
}

// inRange reports whether [off, off+n) lies inside the export.
func (c *conn) inRange(off, n uint64) bool {
	return off <= uint64(c.size) && n <= uint64(c.size)-off
}

// maxLentParts bounds the backend's buffers one request holds; a bigger
// request is copied through a buffer of its own, so that a few of them
// cannot hold every tag.
const maxLentParts = 4

// lendable reports whether a started rq uses the backend's buffers.
func (c *conn) lendable(rq Request) bool {
	return c.startable(rq) && (rq.Length+c.partMax-1)/c.partMax <= maxLentParts
}

// readPayload reads a WRITE's payload: into the backend's buffers when the
// request will be started on them, else into a buffer of its own. The
// payload of a request handle will refuse is read and dropped: it must
// not hold a backend's buffer (its error reply may be held back while the
// reader goes on, and a ring's worth of those once left the reader
// waiting for a buffer only its own held replies would free), nor memory.
func (c *conn) readPayload(r *req, plen uint64) error {
	if c.refused(r.Request) {
		_, err := io.CopyN(io.Discard, c.br, int64(plen))
		return err
	}
	if r.Type == nbdwire.CmdWrite {
		lent, err := c.eng.lendPayload(r, plen)
		if lent || err != nil {
			return err
		}
	}
	r.buf, r.bufp = getBuf(int(plen))
	_, err := io.ReadFull(c.br, r.buf)
	return err
}

// streamWrite serves a WRITE above MaxPayload on the reader goroutine:
// its payload is read from the socket and written to the backend one
// streamChunk at a time. A backend error does not end the reading (the
// rest of the payload must be consumed to stay in frame); it is the
// reply. Only a socket error is returned.
func (c *conn) streamWrite(r *req) error {
	c.s.stats.writes.Add(1)
	buf, bufp := getBuf(streamChunk)
	defer putBuf(bufp)
	var writeErr error
	for off := uint64(0); off < r.Length; {
		n := min(streamChunk, r.Length-off)
		if _, err := io.ReadFull(c.br, buf[:n]); err != nil {
			c.release(r)
			return fmt.Errorf("nbd: reading %d-byte payload: %w", r.Length, err)
		}
		if writeErr == nil {
			writeErr = writeAll(c.be, buf[:n], int64(r.Offset+off))
		}
		off += n
	}
	if writeErr != nil {
		c.replyBackendErr(r, "write", writeErr)
		return nil
	}
	c.s.stats.bytesWritten.Add(r.Length)
	c.finishWrite(r)
	return nil
}
