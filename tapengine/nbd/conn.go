package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"log/slog"
	"math/bits"
	"net"
	"sync"
	"sync/atomic"
	"time"
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
	// inlineMax: the largest read the reader runs itself; inlineWriteMax
	// the largest write (Export.InlineWrites).
	inlineMax      = 128 << 10
	inlineWriteMax = 1 << 20
	// slowInline: an inline request slower than this hit the disk, not
	// the page cache; the next inlinePause requests go to the workers.
	slowInline  = 200 * time.Microsecond
	inlinePause = 256
	// maxDeferred bounds the replies the reader holds back.
	maxDeferred = 64
	// ownSendMin: a read reply at least this big waits for the writer
	// role and is sent by the goroutine that read it (send).
	ownSendMin = 64 << 10
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
	// holdReply: the reader ran or started it, and its reply may wait
	// for kick, which the reader calls before it waits for its client.
	holdReply bool

	// A request started on the async backend, in parts of up to
	// partMax bytes; the last part's Complete answers it.
	idx       int          // in conn.reqs: the low half of a part's cookie
	partsLeft atomic.Int32 // parts not yet completed
	errMu     sync.Mutex
	firstErr  error // the first failed part's error, under errMu
	// lent: its buffers are the backend's tags (one per part); a READ's
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
// write side. Fields under writeMu and budgetMu are guarded by them.
type conn struct {
	s    *Server
	nc   net.Conn
	br   *bufio.Reader
	sess *session
	size int64
	ro   bool
	log  *slog.Logger

	// The backend and the optional capabilities it has (nil if not).
	be         Backend
	discarder  Discarder
	mapper     Mapper
	zeroWriter ZeroWriter
	eng        engine       // where the reader starts each request
	async      AsyncBackend // only when Export.RoundTrip is set
	partMax    uint64       // async.StartMax()
	// started counts started requests not yet answered; unfinished
	// waits for their completions.
	started    atomic.Int32
	unfinished sync.WaitGroup
	reqs       []*req

	free chan *req
	work chan *req

	writeMu    sync.Mutex
	writerDone *sync.Cond // on writeMu: writing went false
	pending    []*req     // done, waiting for the writer
	spare      []*req
	writing    bool
	writeErr   error
	iov        [][]byte    // writer role only
	writeBufs  net.Buffers // writer role only
	// tlsWriter gathers a batch into TLS records when nc is a TLS session,
	// which has no writev: written buffer by buffer, every reply header
	// would cost a record and a system call of its own. Writer role only.
	tlsWriter *bufio.Writer

	// inlineOff counts requests still to hand to workers after a slow
	// inline one. Reader goroutine only.
	inlineOff int

	budgetMu    sync.Mutex
	budgetFreed *sync.Cond // on budgetMu: budgetUsed went down
	budgetUsed  int64
}

func newConn(s *Server, nc net.Conn, br *bufio.Reader, sess *session) *conn {
	c := &conn{
		s: s, nc: nc, br: br, sess: sess,
		be:   s.Export.Backend,
		size: s.Export.Backend.Size(),
		ro:   s.Export.ReadOnly,
		log:  s.logger(),
	}
	c.discarder, _ = c.be.(Discarder)
	c.mapper, _ = c.be.(Mapper)
	c.zeroWriter, _ = c.be.(ZeroWriter)
	c.eng = syncEngine{c}
	if ab, ok := c.be.(AsyncBackend); ok && s.Export.RoundTrip {
		c.async, c.partMax = ab, uint64(ab.StartMax())
		c.eng = asyncEngine{c, ab}
	}
	if _, ok := nc.(*tls.Conn); ok {
		c.tlsWriter = bufio.NewWriterSize(nc, 64<<10)
	}
	c.budgetFreed = sync.NewCond(&c.budgetMu)
	c.writerDone = sync.NewCond(&c.writeMu)
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
	workers := maxWorkers
	if c.s.Export.Workers > 0 {
		workers = c.s.Export.Workers
	}
	for i := 0; i < min(c.s.maxInFlight(), workers); i++ {
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
	c.eng.drain()
	if err == nil {
		c.writeMu.Lock()
		err = c.writeErr
		c.writeMu.Unlock()
	}
	return err
}

// acquire draws a big request's bytes from the budget, waiting while
// others hold it (but never when nothing is held, so any single request
// up to MaxPayload proceeds).
func (c *conn) acquire(r *req, n int64) {
	if n <= bigRequest {
		return
	}
	c.budgetMu.Lock()
	for c.budgetUsed > 0 && c.budgetUsed+n > bigBudget {
		c.budgetFreed.Wait()
	}
	c.budgetUsed += n
	c.budgetMu.Unlock()
	r.budget = n
}

// release returns a request's buffer and budget and puts it back on the
// free list.
func (c *conn) release(r *req) {
	if r.bufp != nil {
		putBuf(r.bufp)
	}
	r.buf, r.bufp = nil, nil
	r.holdReply = false
	for _, h := range r.tags {
		c.async.PutTag(h)
	}
	r.tags, r.lent = r.tags[:0], false
	clear(r.lentData)
	if r.budget > 0 {
		c.budgetMu.Lock()
		c.budgetUsed -= r.budget
		c.budgetMu.Unlock()
		c.budgetFreed.Broadcast()
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
