package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/blktap-go/blktap/internal/nbdwire"
	"io"
	"log/slog"
	"math/bits"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blktap-go/blktap/formats/image"
)

const (
	// maxWorkers bounds the goroutines that run one connection's requests.
	// Requests beyond it wait in the queue (still "in flight" to the
	// client); a goroutine per request would cost a spawn each time.
	maxWorkers = 16
	// bigRequest: payloads above this size draw on a per-connection byte
	// budget, so MaxInFlight huge requests cannot pin gigabytes.
	bigRequest = 1 << 20
	// bigBudget is that budget: two maximal payloads at once.
	bigBudget = 2 * MaxPayload
	// sparseMin: reads at least this long ask the backend's map first and
	// answer holes with OFFSET_HOLE; below it the extra map lookup costs
	// more than the bytes it saves.
	sparseMin = 64 << 10
	// maxSparseChunks: a read more fragmented than this is sent whole.
	maxSparseChunks = 256
	// maxDescriptors caps the block status descriptors in one reply.
	maxDescriptors = 1 << 16
	// zeroChunk is the largest write of zeros WRITE_ZEROES issues at once
	// when the backend has nothing faster.
	zeroChunk = 1 << 20
	// inlineMax: the largest read or write the reader runs itself.
	inlineMax = 128 << 10
	// slowInline: an inline request slower than this hit the disk, not
	// the page cache; the next inlinePause requests go to the workers.
	slowInline  = 200 * time.Microsecond
	inlinePause = 256
	// maxDeferred bounds the replies the reader holds back.
	maxDeferred = 64
	// pollSpin: how long the reader polls a Poller for the answer to its
	// one started request before it goes to wait for its client.
	pollSpin = 50 * time.Microsecond
	// qd1Streak: requests in a row at queue depth 1 before the reader
	// polls; a deeper queue passes through depth 1 now and then.
	qd1Streak = 16
)

var zeroBuf = make([]byte, zeroChunk)

// req is one request travelling reader -> worker -> writer. A fixed set
// per connection is recycled through conn.free, which is also what limits
// the requests in flight.
type req struct {
	Request
	buf     []byte  // WRITE payload or READ data
	bufp    *[]byte // pooled backing of buf, nil if none
	budget  int64   // bytes drawn from the connection's big budget
	scratch []byte  // reply headers and small payloads
	iov     [][]byte
	segs    []seg
	// deferred: run inline by the reader; its reply may wait for kick.
	deferred bool
	// start: the reader starts it on the Starter, in parts of up to
	// StartMax bytes; the last part's Complete answers it.
	start bool
	idx   int          // in conn.reqs: the low half of a part's cookie
	parts atomic.Int32 // parts not yet completed
	emu   sync.Mutex
	perr  error // the first part's error
	// lent: its buffers are the Lender's tags (one per part); a READ's
	// data is in lentData, part by part.
	lent     bool
	tags     []uint64
	lentData [][]byte
}

type seg struct {
	off, n int64
	zero   bool
}

// conn is one connection in transmission. Ownership: the reader goroutine
// owns br and fills reqs; a worker owns a req while it runs it; the writer
// role (whichever goroutine holds c.writing) owns iov and the socket's
// write side. Fields under wmu are guarded by it.
type conn struct {
	s      *Server
	nc     net.Conn
	br     *bufio.Reader
	sess   *session
	be     Backend
	disc   Discarder
	mapper Mapper
	zw     ZeroWriter
	st     Starter // nil unless the backend is one and RoundTrip is set
	stMax  uint64
	lender Lender // the Starter's, if it lends its buffers
	poller Poller // the Starter's, if callers may poll for completions
	// started counts started requests not yet answered.
	started atomic.Int32
	reqs    []*req
	async   sync.WaitGroup // started requests not yet completed
	size    int64
	ro      bool
	log     *slog.Logger

	free chan *req
	work chan *req

	wmu     sync.Mutex
	wcond   *sync.Cond // on wmu: writing went false
	pending []*req     // done, waiting for the writer
	spare   []*req
	writing bool
	werr    error
	iov     [][]byte    // writer role only
	nb      net.Buffers // writer role only
	// tlsw gathers a batch into TLS records when nc is a TLS session,
	// which has no writev: written buffer by buffer, every reply header
	// would cost a record and a system call of its own. Writer role only.
	tlsw *bufio.Writer

	// inlineOff counts requests still to hand to workers after a slow
	// inline one. Reader goroutine only.
	inlineOff int

	bmu   sync.Mutex
	bcond *sync.Cond
	bused int64
}

func newConn(s *Server, nc net.Conn, br *bufio.Reader, sess *session) *conn {
	c := &conn{
		s: s, nc: nc, br: br, sess: sess,
		be:   s.Export.Backend,
		size: s.Export.Backend.Size(),
		ro:   s.Export.ReadOnly,
		log:  s.logger(),
	}
	c.disc, _ = c.be.(Discarder)
	c.mapper, _ = c.be.(Mapper)
	c.zw, _ = c.be.(ZeroWriter)
	if st, ok := c.be.(Starter); ok && s.Export.RoundTrip {
		c.st, c.stMax = st, uint64(st.StartMax())
		c.lender, _ = st.(Lender)
		c.poller, _ = st.(Poller)
	}
	if _, ok := nc.(*tls.Conn); ok {
		c.tlsw = bufio.NewWriterSize(nc, 64<<10)
	}
	c.bcond = sync.NewCond(&c.bmu)
	c.wcond = sync.NewCond(&c.wmu)
	n := s.maxInFlight()
	c.free = make(chan *req, n)
	c.work = make(chan *req, n)
	c.reqs = make([]*req, n)
	for i := range c.reqs {
		c.reqs[i] = &req{scratch: make([]byte, 0, 128), iov: make([][]byte, 0, 4), idx: i}
		c.free <- c.reqs[i]
	}
	return c
}

// serve runs transmission until the client leaves or the connection
// fails, then waits until every request read has been answered.
func (c *conn) serve(ctx context.Context) error {
	var wg sync.WaitGroup
	for i := 0; i < min(c.s.maxInFlight(), maxWorkers); i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range c.work {
				c.handle(r)
			}
		}()
	}
	err := c.readLoop()
	close(c.work)
	wg.Wait()
	if c.st != nil {
		c.async.Wait()
		c.kick() // the last batch's replies, if its CompleteBatch lost the race
	}
	if err == nil {
		c.wmu.Lock()
		err = c.werr
		c.wmu.Unlock()
	}
	return err
}

// readLoop reads requests and their payloads and runs or queues them. It
// returns nil on NBD_CMD_DISC or a clean hang-up between requests.
//
// Small reads (and block status, cache) run right here, with their
// replies held back until no complete request is left in the read
// buffer; then one writev sends them all. That is DESIGN.md's measured
// lesson: hand-offs and wake-ups, not copies, bound a block server on
// these machines. Everything that may block for long (writes, flush,
// trim, zeroing, big transfers) goes to the workers, and so does
// everything after an inline request turned out slow (a page-cache miss
// on a real disk), so one slow disk read does not serialise the queue.
func (c *conn) readLoop() (err error) {
	hsz := nbdwire.RequestSize
	if c.sess.extended {
		hsz = nbdwire.ExtRequestSize
	}
	// Replies and started requests held back must go out whatever ends
	// the loop.
	defer c.flushHeld()
	var hb [nbdwire.ExtRequestSize]byte
	// run counts the requests read since the reader last found its
	// buffer empty, qd1 the times in a row that was one request with
	// nothing else in flight: a client that waits for every answer.
	run, qd1 := 0, 0
	for {
		if c.br.Buffered() < hsz {
			c.flushHeld() // about to wait for the client: send what we have
			if run == 1 && c.started.Load() == 1 {
				qd1++
			} else {
				qd1 = 0
			}
			if c.poller != nil && qd1 >= qd1Streak {
				// Queue depth 1: the answer comes before a sleeping
				// reaper could be woken for it. Deeper queues leave
				// it to the reaper: a poller beside it there costs
				// more wake-ups than it saves.
				c.poller.Poll(pollSpin)
			}
			run = 0
		}
		run++
		if _, err := io.ReadFull(c.br, hb[:hsz]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("nbd: reading request: %w", err)
		}
		rq, err := ParseRequest(hb[:hsz], c.sess.extended)
		if err != nil {
			return err
		}
		var plen uint64
		if rq.Type == nbdwire.CmdWrite || (c.sess.extended && rq.Flags&nbdwire.CmdFlagPayloadLen != 0) {
			plen = rq.Length
		}
		if plen > MaxStreamed {
			// Its payload would follow; we will not read it, and
			// without it the stream is out of frame.
			return fmt.Errorf("%w: payload of %d bytes exceeds %d", ErrProtocol, plen, MaxStreamed)
		}
		if rq.Type == nbdwire.CmdDisc {
			return nil
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
			if err := c.streamWrite(r); err != nil {
				return err
			}
			continue
		}
		if plen > 0 {
			if c.br.Buffered() < int(plen) {
				c.flushHeld()
			}
			if err := c.readPayload(r, plen); err != nil {
				c.release(r)
				return fmt.Errorf("nbd: reading %d-byte payload: %w", plen, err)
			}
		}
		if c.startable(rq) {
			r.start, r.deferred = true, true
			c.handle(r)
			continue
		}
		if c.inlineable(rq) {
			c.runInline(r)
			continue
		}
		c.work <- r
	}
}

// flushHeld sends the replies the reader held back and publishes the
// requests it started.
func (c *conn) flushHeld() {
	c.kick()
	if c.st != nil {
		if err := c.st.Publish(); err != nil {
			c.log.Debug("nbd: publishing started requests", "err", err)
		}
	}
}

// maxLentParts bounds the Lender's buffers one request holds; a bigger
// request is copied through a buffer of its own, so that a few of them
// cannot hold every tag.
const maxLentParts = 4

// lendable reports whether a started rq uses the Lender's buffers.
func (c *conn) lendable(rq Request) bool {
	return c.lender != nil && c.startable(rq) && (rq.Length+c.stMax-1)/c.stMax <= maxLentParts
}

// readPayload reads a WRITE's payload: into the Lender's buffers when the
// request will be started on them, else into a buffer of its own. The
// payload of a request handle will refuse is read and dropped: it must
// not hold a Lender's buffer (its error reply may be held back while the
// reader goes on, and a ring's worth of those once left the reader
// waiting for a buffer only its own held replies would free), nor memory.
func (c *conn) readPayload(r *req, plen uint64) error {
	if c.refused(r.Request) {
		_, err := io.CopyN(io.Discard, c.br, int64(plen))
		return err
	}
	if c.lendable(r.Request) && r.Type == nbdwire.CmdWrite {
		for off := uint64(0); off < plen; off += c.stMax {
			h, buf, err := c.lender.TakeTag()
			if err != nil {
				// The backend is gone; the request fails when started.
				// The payload must still be read to stay in frame.
				for _, h := range r.tags {
					c.lender.PutTag(h)
				}
				r.tags, r.lent = r.tags[:0], false
				break
			}
			r.tags, r.lent = append(r.tags, h), true
			n := min(c.stMax, plen-off)
			if _, err := io.ReadFull(c.br, buf[:n]); err != nil {
				return err
			}
		}
		if r.lent {
			return nil
		}
	}
	r.buf, r.bufp = getBuf(int(plen))
	_, err := io.ReadFull(c.br, r.buf)
	return err
}

// startable reports whether the reader should start rq on the Starter.
func (c *conn) startable(rq Request) bool {
	if c.st == nil || rq.Length == 0 || rq.Length > MaxPayload || rq.Offset%512 != 0 || rq.Length%512 != 0 {
		return false
	}
	switch rq.Type {
	case nbdwire.CmdRead:
		// A sparse read asks the map first; a started read cannot.
		return !c.sess.structured || c.mapper == nil || rq.Length < sparseMin || rq.Flags&nbdwire.CmdFlagDF != 0
	case nbdwire.CmdWrite:
		return rq.Flags&nbdwire.CmdFlagFUA == 0
	}
	return false
}

// start starts a validated READ or WRITE in parts of up to StartMax
// bytes; the part cookies are the request's index and, in the high half,
// the part's number. The last part to finish answers the request.
func (c *conn) start(r *req) {
	parts := int32((r.Length + c.stMax - 1) / c.stMax)
	r.parts.Store(parts)
	r.perr = nil
	c.async.Add(1)
	c.started.Add(1)
	if r.Type == nbdwire.CmdRead {
		if c.lendable(r.Request) {
			r.lent = true
			r.lentData = slices.Grow(r.lentData[:0], int(parts))[:parts]
		} else {
			r.buf, r.bufp = getBuf(int(r.Length))
		}
	}
	for i := range parts {
		off := uint64(i) * c.stMax
		n := min(c.stMax, r.Length-off)
		cookie := uint64(r.idx) | uint64(i)<<32
		var err error
		switch {
		case r.Type == nbdwire.CmdRead && r.lent:
			var h uint64
			if h, _, err = c.lender.TakeTag(); err == nil {
				r.tags = append(r.tags, h)
				err = c.lender.StartTagRead(h, int64(r.Offset+off), int(n), c, cookie)
			}
		case r.Type == nbdwire.CmdRead:
			err = c.st.StartRead(int64(r.Offset+off), int(n), c, cookie)
		case r.lent:
			err = c.lender.StartTagWrite(r.tags[i], int64(r.Offset+off), int(n), c, cookie)
		default:
			err = c.st.StartWrite(r.buf[off:off+n], int64(r.Offset+off), c, cookie)
		}
		if err != nil {
			// The parts from i on never start.
			c.partsDone(r, parts-i, err)
			return
		}
	}
}

// Complete finishes one part of a started request (Completer; on the
// Starter's goroutine). The reply waits for CompleteBatch.
func (c *conn) Complete(cookie uint64, data []byte, err error) {
	r := c.reqs[uint32(cookie)]
	if err == nil && r.Type == nbdwire.CmdRead {
		if r.lent {
			r.lentData[cookie>>32] = data
		} else {
			copy(r.buf[(cookie>>32)*c.stMax:], data)
		}
	}
	c.partsDone(r, 1, err)
}

// partsDone accounts k parts of r as finished and answers r after its
// last one.
func (c *conn) partsDone(r *req, k int32, err error) {
	r.emu.Lock()
	if r.perr == nil {
		r.perr = err
	}
	r.emu.Unlock()
	if r.parts.Add(-k) != 0 {
		return
	}
	c.started.Add(-1)
	r.emu.Lock()
	err = r.perr
	r.emu.Unlock()
	r.deferred = true
	switch {
	case r.Type == nbdwire.CmdRead && err == nil:
		c.s.stats.bytesRead.Add(r.Length)
		c.replyData(r)
	case r.Type == nbdwire.CmdRead:
		c.replyBackendErr(r, "read", err)
	case err == nil:
		c.s.stats.bytesWritten.Add(r.Length)
		c.replyOK(r)
	default:
		c.replyBackendErr(r, "write", err)
	}
	c.async.Done()
}

// CompleteBatch sends the replies of a batch of completions in one write.
func (c *conn) CompleteBatch() { c.kick() }

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
		// the workers for a while.
		return c.s.Export.InlineWrites && rq.Flags&nbdwire.CmdFlagFUA == 0 && rq.Length <= inlineMax
	}
	return false
}

// runInline runs r on the reader goroutine with its reply held back, and
// turns inlining off for a while if it was slow.
func (c *conn) runInline(r *req) {
	start := time.Now()
	r.deferred = true
	c.handle(r)
	if time.Since(start) > slowInline {
		c.inlineOff = inlinePause
	}
}

// acquire draws a big request's bytes from the budget, waiting while
// others hold it (but never when nothing is held, so any single request
// up to MaxPayload proceeds).
func (c *conn) acquire(r *req, n int64) {
	if n <= bigRequest {
		return
	}
	c.bmu.Lock()
	for c.bused > 0 && c.bused+n > bigBudget {
		c.bcond.Wait()
	}
	c.bused += n
	c.bmu.Unlock()
	r.budget = n
}

// release returns a request's buffer and budget and puts it back on the
// free list.
func (c *conn) release(r *req) {
	if r.bufp != nil {
		putBuf(r.bufp)
	}
	r.buf, r.bufp = nil, nil
	r.deferred, r.start = false, false
	for _, h := range r.tags {
		c.lender.PutTag(h)
	}
	r.tags, r.lent = r.tags[:0], false
	clear(r.lentData)
	if r.budget > 0 {
		c.bmu.Lock()
		c.bused -= r.budget
		c.bmu.Unlock()
		c.bcond.Broadcast()
		r.budget = 0
	}
	clear(r.iov)
	r.iov = r.iov[:0]
	r.scratch = r.scratch[:0]
	if cap(r.scratch) > 64<<10 {
		// A huge block status reply; do not pin its memory.
		r.scratch = make([]byte, 0, 128)
	}
	c.free <- r
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

// handle runs one request and queues its reply.
func (c *conn) handle(r *req) {
	st := &c.s.stats
	if r.Flags&^c.allowedFlags(r.Type) != 0 {
		c.replyErr(r, nbdwire.ErrnoInval, "unsupported command flags")
		return
	}
	if c.sess.extended && r.Flags&nbdwire.CmdFlagPayloadLen != 0 && r.Type != nbdwire.CmdWrite {
		// We do not advertise BLOCK_STATUS_PAYLOAD; the payload was read
		// and is dropped.
		c.replyErr(r, nbdwire.ErrnoInval, "unexpected payload")
		return
	}
	switch r.Type {
	case nbdwire.CmdRead:
		st.reads.Add(1)
		switch {
		case r.Length > MaxStreamed:
			c.replyErr(r, nbdwire.ErrnoInval, "read longer than the maximum payload")
		case !c.inRange(r.Offset, r.Length):
			c.replyErr(r, nbdwire.ErrnoInval, "read past the end of the export")
		case r.Length > MaxPayload:
			c.streamRead(r)
		default:
			c.read(r)
		}

	case nbdwire.CmdWrite:
		st.writes.Add(1)
		switch {
		case c.ro:
			c.replyErr(r, nbdwire.ErrnoPerm, "export is read-only")
		case !c.inRange(r.Offset, r.Length):
			c.replyErr(r, nbdwire.ErrnoNoSpace, "write past the end of the export")
		case r.start:
			c.start(r)
		default:
			if err := writeAll(c.be, r.buf, int64(r.Offset)); err != nil {
				c.replyBackendErr(r, "write", err)
				return
			}
			st.bytesWritten.Add(r.Length)
			c.finishWrite(r)
		}

	case nbdwire.CmdFlush:
		st.flushes.Add(1)
		if err := c.be.Flush(); err != nil {
			c.replyBackendErr(r, "flush", err)
			return
		}
		c.replyOK(r)

	case nbdwire.CmdTrim:
		st.trims.Add(1)
		switch {
		case c.ro:
			c.replyErr(r, nbdwire.ErrnoPerm, "export is read-only")
		case c.disc == nil:
			c.replyErr(r, nbdwire.ErrnoInval, "trim not offered")
		case !c.inRange(r.Offset, r.Length):
			c.replyErr(r, nbdwire.ErrnoInval, "trim past the end of the export")
		case r.Length == 0:
			c.replyOK(r)
		default:
			if err := c.disc.Discard(int64(r.Offset), int64(r.Length)); err != nil {
				c.replyBackendErr(r, "trim", err)
				return
			}
			c.finishWrite(r)
		}

	case nbdwire.CmdWriteZeroes:
		st.zeroes.Add(1)
		switch {
		case c.ro:
			c.replyErr(r, nbdwire.ErrnoPerm, "export is read-only")
		case !c.inRange(r.Offset, r.Length):
			c.replyErr(r, nbdwire.ErrnoNoSpace, "write past the end of the export")
		default:
			if e, err := c.writeZeroes(r); err != nil {
				if e == nbdwire.ErrnoNotSup {
					c.replyErr(r, e, "zeroing would not be fast")
				} else {
					c.replyBackendErr(r, "write zeroes", err)
				}
				return
			}
			c.finishWrite(r)
		}

	case nbdwire.CmdCache:
		// Advisory; the page cache already does what a prefetch would.
		if !c.inRange(r.Offset, r.Length) {
			c.replyErr(r, nbdwire.ErrnoInval, "cache past the end of the export")
			return
		}
		c.replyOK(r)

	case nbdwire.CmdBlockStatus:
		st.blockStatus.Add(1)
		c.blockStatus(r)

	default:
		c.replyErr(r, nbdwire.ErrnoInval, fmt.Sprintf("unknown command %d", r.Type))
	}
}

// finishWrite honours FUA once a write-like command is in the image.
func (c *conn) finishWrite(r *req) {
	if r.Flags&nbdwire.CmdFlagFUA != 0 {
		if err := c.be.Flush(); err != nil {
			c.replyBackendErr(r, "flush after FUA", err)
			return
		}
	}
	c.replyOK(r)
}

// writeZeroes zeroes a request's range the fastest way the backend
// offers. It returns nbdwire.ErrnoNotSup (and an error) when FAST_ZERO was asked and
// only the slow way remains.
func (c *conn) writeZeroes(r *req) (uint32, error) {
	off, n := int64(r.Offset), int64(r.Length)
	mayTrim := r.Flags&nbdwire.CmdFlagNoHole == 0
	if n == 0 {
		return 0, nil
	}
	if c.zw != nil {
		err := c.zw.WriteZeroes(off, n, mayTrim)
		if !errors.Is(err, errors.ErrUnsupported) {
			return errno(err), err
		}
	}
	if mayTrim && c.disc != nil {
		err := c.disc.Discard(off, n)
		return errno(err), err
	}
	if r.Flags&nbdwire.CmdFlagFastZero != 0 {
		return nbdwire.ErrnoNotSup, errors.ErrUnsupported
	}
	for n > 0 {
		k := min(n, zeroChunk)
		if err := writeAll(c.be, zeroBuf[:k], off); err != nil {
			return errno(err), err
		}
		off += k
		n -= k
	}
	return 0, nil
}

// read answers a READ that passed validation.
func (c *conn) read(r *req) {
	n := int(r.Length)
	if n == 0 {
		c.replyOK(r)
		return
	}
	if r.start {
		c.start(r)
		return
	}
	r.buf, r.bufp = getBuf(n)
	if c.sess.structured && c.mapper != nil && n >= sparseMin && r.Flags&nbdwire.CmdFlagDF == 0 {
		if c.sparseRead(r) {
			return
		}
	}
	if err := readAll(c.be, r.buf, int64(r.Offset)); err != nil {
		c.replyBackendErr(r, "read", err)
		return
	}
	c.s.stats.bytesRead.Add(uint64(n))
	c.replyData(r)
}

// sparseRead answers a read with OFFSET_DATA and OFFSET_HOLE chunks from
// the backend's map. It returns false, having sent nothing, when the map
// is unusable or shows no hole; the caller then reads it whole.
func (c *conn) sparseRead(r *req) bool {
	off, end := int64(r.Offset), int64(r.Offset+r.Length)
	exts, err := c.mapper.Map(off, end-off)
	if err != nil || len(exts) == 0 {
		return false
	}
	segs := r.segs[:0]
	pos := off
	holes := false
	for _, e := range exts {
		if e.Offset > pos || e.Length <= 0 {
			return false // a gap or nonsense: do not trust the map
		}
		s, t := pos, min(e.Offset+e.Length, end)
		if t <= s {
			continue
		}
		zero := e.Kind != image.Data
		holes = holes || zero
		if k := len(segs); k > 0 && segs[k-1].zero == zero {
			segs[k-1].n += t - s
		} else {
			if len(segs) == maxSparseChunks {
				return false
			}
			segs = append(segs, seg{off: s, n: t - s, zero: zero})
		}
		pos = t
		if pos == end {
			break
		}
	}
	r.segs = segs
	if pos != end || !holes {
		return false
	}
	var sent uint64
	for _, sg := range segs {
		if sg.zero {
			continue
		}
		b := r.buf[sg.off-off : sg.off-off+sg.n]
		if err := readAll(c.be, b, sg.off); err != nil {
			c.replyBackendErr(r, "read", err)
			return true
		}
		sent += uint64(sg.n)
	}
	c.s.stats.bytesRead.Add(sent)
	for i, sg := range segs {
		var fl uint16
		if i == len(segs)-1 {
			fl = nbdwire.ChunkFlagDone
		}
		if sg.zero {
			h := c.chunkHdr(r, fl, nbdwire.ChunkOffsetHole, 12, 12)
			h = binary.BigEndian.AppendUint64(h, uint64(sg.off))
			h = binary.BigEndian.AppendUint32(h, uint32(sg.n))
			r.iov = append(r.iov, h)
		} else {
			h := c.chunkHdr(r, fl, nbdwire.ChunkOffsetData, 8+int(sg.n), 8)
			h = binary.BigEndian.AppendUint64(h, uint64(sg.off))
			r.iov = append(r.iov, h, r.buf[sg.off-off:sg.off-off+sg.n])
		}
	}
	c.send(r)
	return true
}

// blockStatus answers BLOCK_STATUS for every selected meta context.
func (c *conn) blockStatus(r *req) {
	want := r.Length
	if c.sess.extended && r.Offset < uint64(c.size) {
		// With extended headers the length is a hint (as qemu reads
		// the extension): answer up to the end of the export.
		want = min(want, uint64(c.size)-r.Offset)
	}
	switch {
	case !c.sess.structured || !(c.sess.metaAlloc || c.sess.metaDepth):
		c.replyErr(r, nbdwire.ErrnoInval, "no meta context selected")
		return
	case want == 0 || !c.inRange(r.Offset, want):
		c.replyErr(r, nbdwire.ErrnoInval, "block status range outside the export")
		return
	}
	off := int64(r.Offset)
	// A compact reply's descriptor lengths are 32-bit; the request's
	// length is too, so any extent clipped to it fits.
	length := int64(want)
	var exts []image.Extent
	if c.mapper != nil {
		var err error
		exts, err = c.mapper.Map(off, length)
		if err != nil {
			c.replyBackendErr(r, "map", err)
			return
		}
	} else {
		exts = []image.Extent{{Offset: off, Length: length, Kind: image.Data}}
	}
	type ctx struct {
		id   uint32
		flag func(e image.Extent) uint32
	}
	var ctxs [2]ctx
	k := 0
	if c.sess.metaAlloc {
		ctxs[k] = ctx{ctxBaseAllocation, allocFlags}
		k++
	}
	if c.sess.metaDepth {
		ctxs[k] = ctx{ctxAllocDepth, depthFlags}
		k++
	}
	for i, cx := range ctxs[:k] {
		// Descriptors, merged where the flags agree.
		type desc struct{ n, f uint64 }
		var ds []desc
		pos, end := off, off+length
		for _, e := range exts {
			if e.Offset > pos || e.Length <= 0 {
				break // the map has a gap: report what is known
			}
			t := min(e.Offset+e.Length, end)
			if t <= pos {
				continue
			}
			f := uint64(cx.flag(e))
			if j := len(ds); j > 0 && ds[j-1].f == f {
				ds[j-1].n += uint64(t - pos)
			} else {
				if len(ds) == maxDescriptors {
					break
				}
				ds = append(ds, desc{uint64(t - pos), f})
			}
			pos = t
			if pos == end {
				break
			}
		}
		if len(ds) == 0 {
			c.replyErr(r, nbdwire.ErrnoIO, "backend map covers nothing")
			return
		}
		if r.Flags&nbdwire.CmdFlagReqOne != 0 {
			ds = ds[:1]
		}
		var fl uint16
		if i == k-1 {
			fl = nbdwire.ChunkFlagDone
		}
		if c.sess.extended {
			h := c.chunkHdr(r, fl, nbdwire.ChunkBlockStatusExt, 8+16*len(ds), 8+16*len(ds))
			h = binary.BigEndian.AppendUint32(h, cx.id)
			h = binary.BigEndian.AppendUint32(h, uint32(len(ds)))
			for _, d := range ds {
				h = binary.BigEndian.AppendUint64(h, d.n)
				h = binary.BigEndian.AppendUint64(h, d.f)
			}
			r.iov = append(r.iov, h)
		} else {
			h := c.chunkHdr(r, fl, nbdwire.ChunkBlockStatus, 4+8*len(ds), 4+8*len(ds))
			h = binary.BigEndian.AppendUint32(h, cx.id)
			for _, d := range ds {
				h = binary.BigEndian.AppendUint32(h, uint32(d.n))
				h = binary.BigEndian.AppendUint32(h, uint32(d.f))
			}
			r.iov = append(r.iov, h)
		}
	}
	c.send(r)
}

// allocFlags is base:allocation's view of an extent.
func allocFlags(e image.Extent) uint32 {
	switch e.Kind {
	case image.Hole:
		return nbdwire.StateHole | nbdwire.StateZero
	case image.Zero:
		return nbdwire.StateZero
	}
	return 0
}

// depthFlags is qemu:allocation-depth's: 0 unallocated, else 1 + layer.
func depthFlags(e image.Extent) uint32 {
	if e.Kind == image.Hole {
		return 0
	}
	return uint32(e.Depth) + 1
}

// chunkHdr appends to r.scratch a structured (or extended) reply header
// announcing a payload of n bytes, plus room for the first fixed bytes of
// that payload, and returns the header with that room as spare capacity:
// the caller appends exactly fixed bytes. Slices handed out earlier stay
// valid if scratch grows, since they keep the old array.
func (c *conn) chunkHdr(r *req, flags, typ uint16, n, fixed int) []byte {
	hs := nbdwire.ChunkHeaderSize
	if c.sess.extended {
		hs = nbdwire.ExtReplyHeaderSize
	}
	start := len(r.scratch)
	r.scratch = slices.Grow(r.scratch, hs+fixed)[:start+hs+fixed]
	if c.sess.extended {
		nbdwire.PutExtReplyHeader(r.scratch[start:], flags, typ, r.Cookie, r.Offset, uint64(n))
	} else {
		nbdwire.PutChunkHeader(r.scratch[start:], flags, typ, r.Cookie, uint32(n))
	}
	return r.scratch[start : start+hs : start+hs+fixed]
}

// replyOK answers success without payload.
func (c *conn) replyOK(r *req) {
	if c.sess.extended || (c.sess.structured && r.Type == nbdwire.CmdRead) {
		r.iov = append(r.iov, c.chunkHdr(r, nbdwire.ChunkFlagDone, nbdwire.ChunkNone, 0, 0))
	} else {
		r.iov = append(r.iov, c.simpleHdr(r, 0))
	}
	c.send(r)
}

// replyData answers a READ with r.buf (or, lent, with r.lentData).
func (c *conn) replyData(r *req) {
	if c.sess.structured {
		h := c.chunkHdr(r, nbdwire.ChunkFlagDone, nbdwire.ChunkOffsetData, 8+int(r.Length), 8)
		h = binary.BigEndian.AppendUint64(h, r.Offset)
		r.iov = append(r.iov, h)
	} else {
		r.iov = append(r.iov, c.simpleHdr(r, 0))
	}
	if r.lent {
		r.iov = append(r.iov, r.lentData...)
	} else {
		r.iov = append(r.iov, r.buf)
	}
	c.send(r)
}

func (c *conn) replyBackendErr(r *req, what string, err error) {
	c.log.Debug("nbd: backend error", "op", what, "offset", r.Offset, "length", r.Length, "err", err)
	c.replyErr(r, errno(err), what+" failed")
}

// replyErr answers with an NBD error; structured replies carry msg too.
func (c *conn) replyErr(r *req, e uint32, msg string) {
	c.s.stats.errors.Add(1)
	if c.sess.extended || (c.sess.structured && (r.Type == nbdwire.CmdRead || r.Type == nbdwire.CmdBlockStatus)) {
		if len(msg) > nbdwire.MaxStringLen {
			msg = msg[:nbdwire.MaxStringLen]
		}
		h := c.chunkHdr(r, nbdwire.ChunkFlagDone, nbdwire.ChunkError, 6+len(msg), 6+len(msg))
		h = binary.BigEndian.AppendUint32(h, e)
		h = binary.BigEndian.AppendUint16(h, uint16(len(msg)))
		h = append(h, msg...)
		r.iov = append(r.iov, h)
	} else {
		r.iov = append(r.iov, c.simpleHdr(r, e))
	}
	c.send(r)
}

func (c *conn) simpleHdr(r *req, e uint32) []byte {
	start := len(r.scratch)
	r.scratch = slices.Grow(r.scratch, nbdwire.SimpleReplySize)[:start+nbdwire.SimpleReplySize]
	nbdwire.PutSimpleReply(r.scratch[start:], e, r.Cookie)
	return r.scratch[start:len(r.scratch):len(r.scratch)]
}

// kick sends every reply held back by the reader, unless a writer is
// already at work (it sends them on its next round).
func (c *conn) kick() {
	c.wmu.Lock()
	if c.writing || len(c.pending) == 0 {
		c.wmu.Unlock()
		return
	}
	c.writeLocked()
}

// send queues r's reply. Whoever finds no writer active becomes the writer
// and sends everything queued meanwhile in one writev per batch, so
// replies finishing together share a syscall and no goroutine exists just
// to write.
func (c *conn) send(r *req) {
	c.wmu.Lock()
	c.pending = append(c.pending, r)
	if c.writing || (r.deferred && len(c.pending) < maxDeferred) {
		// A writer will take it, or the reader kicks it out before it
		// next waits.
		c.wmu.Unlock()
		return
	}
	c.writeLocked()
}

// writeLocked takes the writer role (wmu held on entry, released on
// return) and writes until nothing is pending.
func (c *conn) writeLocked() {
	c.writing = true
	for len(c.pending) > 0 {
		batch := c.pending
		c.pending = c.spare[:0]
		failed := c.werr != nil
		c.wmu.Unlock()
		err := c.writeBatch(batch, failed)
		c.wmu.Lock()
		if err != nil && c.werr == nil {
			c.werr = err
		}
		clear(batch)
		c.spare = batch[:0]
	}
	c.writing = false
	c.wcond.Broadcast()
	c.wmu.Unlock()
}

// writeBatch writes the replies of batch and recycles them. Once a write
// failed, replies are dropped: the connection is being torn down.
func (c *conn) writeBatch(batch []*req, failed bool) error {
	var err error
	if !failed {
		iov := c.iov[:0]
		for _, r := range batch {
			iov = append(iov, r.iov...)
		}
		// WriteTo consumes its receiver; a field (not a local) keeps
		// that from escaping to the heap on every batch.
		if c.tlsw != nil {
			err = c.writeTLS(iov)
		} else {
			c.nb = iov
			_, err = c.nb.WriteTo(c.nc)
		}
		clear(iov)
		c.iov, c.nb = iov[:0], nil
		if err != nil {
			err = fmt.Errorf("nbd: writing replies: %w", err)
			// Unblock the reader so the connection ends.
			c.nc.Close()
		}
	}
	for _, r := range batch {
		c.release(r)
	}
	return err
}

// writeTLS writes iov through tlsw: 64 KiB writes (full 16 KiB TLS
// records) while the batch lasts, and one flush at its end.
func (c *conn) writeTLS(iov [][]byte) error {
	for _, b := range iov {
		if _, err := c.tlsw.Write(b); err != nil {
			return err
		}
	}
	return c.tlsw.Flush()
}

// readAll reads len(b) bytes at off. io.ReaderAt may report io.EOF with a
// full read at the end of the disk; that is success, and a short read
// with no error (a broken backend) is an I/O error, never stale bytes
// sent as data.
func readAll(be Backend, b []byte, off int64) error {
	n, err := be.ReadAt(b, off)
	if n == len(b) && (err == nil || err == io.EOF) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = fmt.Errorf("nbd: short read of %d at %d: %w", n, off, io.ErrUnexpectedEOF)
	}
	return err
}

// writeAll writes b at off; a short write without an error is an error.
func writeAll(be Backend, b []byte, off int64) error {
	n, err := be.WriteAt(b, off)
	if err == nil && n != len(b) {
		err = fmt.Errorf("nbd: short write of %d at %d: %w", n, off, io.ErrShortWrite)
	}
	return err
}

// Buffer pool: power-of-two classes from 4 KiB to MaxPayload, so the hot
// path allocates nothing once warm.
const (
	minClass = 12
	maxClass = 25 // log2(MaxPayload)
)

var pools [maxClass + 1]sync.Pool

func getBuf(n int) ([]byte, *[]byte) {
	class := max(minClass, bits.Len(uint(n-1)))
	if class > maxClass {
		b := make([]byte, n)
		return b, nil
	}
	if p, ok := pools[class].Get().(*[]byte); ok {
		return (*p)[:n], p
	}
	b := make([]byte, 1<<class)
	return b[:n], &b
}

func putBuf(p *[]byte) {
	class := bits.Len(uint(cap(*p) - 1))
	if cap(*p) != 1<<class || class < minClass || class > maxClass {
		return
	}
	pools[class].Put(p)
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
	var werr error
	for off := uint64(0); off < r.Length; {
		n := min(streamChunk, r.Length-off)
		if _, err := io.ReadFull(c.br, buf[:n]); err != nil {
			c.release(r)
			return fmt.Errorf("nbd: reading %d-byte payload: %w", r.Length, err)
		}
		if werr == nil {
			werr = writeAll(c.be, buf[:n], int64(r.Offset+off))
		}
		off += n
	}
	if werr != nil {
		c.replyBackendErr(r, "write", werr)
		return nil
	}
	c.s.stats.bytesWritten.Add(r.Length)
	c.finishWrite(r)
	return nil
}

// streamRead serves a validated READ above MaxPayload: it takes the
// writer role for the whole reply and sends it a streamChunk at a time,
// read from the backend as it goes. With structured replies each part is
// its own data chunk, and a backend error is an error chunk; a simple
// reply cannot report an error once its data began, so the connection is
// closed instead, as the protocol requires.
func (c *conn) streamRead(r *req) {
	c.wmu.Lock()
	for c.writing {
		c.wcond.Wait()
	}
	c.writing = true
	failed := c.werr != nil
	c.wmu.Unlock()

	var err error
	if !failed {
		err = c.streamReadParts(r)
	}
	c.release(r)
	c.wmu.Lock()
	if err != nil && c.werr == nil {
		c.werr = err
	}
	if len(c.pending) > 0 {
		c.writeLocked() // replies queued while the stream had the socket
		return
	}
	c.writing = false
	c.wcond.Broadcast()
	c.wmu.Unlock()
}

// streamReadParts writes r's reply; the caller holds the writer role. It
// returns an error only when the connection must end.
func (c *conn) streamReadParts(r *req) error {
	buf, bufp := getBuf(streamChunk)
	defer putBuf(bufp)
	for off := uint64(0); off < r.Length; {
		n := min(streamChunk, r.Length-off)
		last := off+n == r.Length
		r.scratch = r.scratch[:0]
		var hdr []byte
		if err := readAll(c.be, buf[:n], int64(r.Offset+off)); err != nil {
			c.log.Debug("nbd: backend error", "op", "read", "offset", r.Offset+off, "length", n, "err", err)
			c.s.stats.errors.Add(1)
			if !c.sess.structured && off > 0 {
				c.nc.Close()
				return fmt.Errorf("nbd: read of %d bytes at %d failed after its simple reply began: %w", r.Length, r.Offset, err)
			}
			if c.sess.structured {
				msg := "read failed"
				hdr = c.chunkHdr(r, nbdwire.ChunkFlagDone, nbdwire.ChunkError, 6+len(msg), 6+len(msg))
				hdr = binary.BigEndian.AppendUint32(hdr, errno(err))
				hdr = binary.BigEndian.AppendUint16(hdr, uint16(len(msg)))
				hdr = append(hdr, msg...)
			} else {
				hdr = c.simpleHdr(r, errno(err))
			}
			return c.writeRaw(hdr)
		}
		switch {
		case c.sess.structured:
			var flags uint16
			if last {
				flags = nbdwire.ChunkFlagDone
			}
			hdr = c.chunkHdr(r, flags, nbdwire.ChunkOffsetData, 8+int(n), 8)
			hdr = binary.BigEndian.AppendUint64(hdr, r.Offset+off)
		case off == 0:
			hdr = c.simpleHdr(r, 0)
		}
		if err := c.writeRaw(hdr, buf[:n]); err != nil {
			return err
		}
		off += n
	}
	c.s.stats.bytesRead.Add(r.Length)
	return nil
}

// writeRaw writes bufs to the client; the caller holds the writer role.
func (c *conn) writeRaw(bufs ...[]byte) error {
	var err error
	if c.tlsw != nil {
		err = c.writeTLS(bufs)
	} else {
		nb := net.Buffers(bufs)
		_, err = nb.WriteTo(c.nc)
	}
	if err != nil {
		c.nc.Close()
		return fmt.Errorf("nbd: writing replies: %w", err)
	}
	return nil
}
