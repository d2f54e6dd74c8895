package nbd

import (
	"cmp"
	"fmt"
	"net"
	"slices"
	"time"

	"github.com/cenkalti/backoff/v4"
	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/internal/nbdwire"
)

// do submits r and waits for its answer.
func (img *Image) do(r *request) error {
	img.submit(r)
	return img.wait(r)
}

// submit registers r and sends it on the current connection; without one,
// the reconnection sends it.
func (img *Image) submit(r *request) {
	r.done = make(chan struct{})
	r.start = time.Now()
	img.mu.Lock()
	if img.closed || img.broken != nil {
		err := img.broken
		if img.closed {
			err = image.ErrClosed
		}
		r.finished, r.err = true, img.errf("%s: %w", nbdwire.CmdName(r.cmd), err)
		close(r.done)
		img.mu.Unlock()
		return
	}
	r.cookie = img.nextCookie
	img.nextCookie++
	img.pending[r.cookie] = r
	c := img.conn
	if c != nil {
		r.sentOn = c
		r.sending++
	}
	img.mu.Unlock()
	if c != nil {
		img.send(c, r)
	}
}

// send writes r on c; the caller has counted it in r.sending.
func (img *Image) send(c *conn, r *request) {
	var hdr [nbdwire.RequestSize]byte
	nbdwire.PutRequest(hdr[:], nbdwire.Request{Flags: r.flags, Type: r.cmd, Cookie: r.cookie, Offset: uint64(r.off), Length: uint64(r.length)}, false)
	c.wmu.Lock()
	var err error
	if r.cmd == nbdwire.CmdWrite {
		bufs := net.Buffers{hdr[:], r.buf}
		_, err = bufs.WriteTo(c.nc)
	} else {
		_, err = c.nc.Write(hdr[:])
	}
	c.wmu.Unlock()
	img.mu.Lock()
	r.sending--
	if r.abandoned {
		img.cond.Broadcast()
	}
	img.mu.Unlock()
	if err != nil {
		img.connFailed(c, fmt.Errorf("send %s: %w", nbdwire.CmdName(r.cmd), err))
	}
}

// wait blocks until r is answered or its deadline passes.
func (img *Image) wait(r *request) error {
	t := time.NewTimer(img.opts.Timeout - time.Since(r.start))
	select {
	case <-r.done:
		t.Stop()
		return r.err
	case <-t.C:
	}
	img.mu.Lock()
	if r.finished {
		img.mu.Unlock()
		<-r.done
		return r.err
	}
	r.abandoned = true
	delete(img.pending, r.cookie)
	c := r.sentOn
	img.mu.Unlock()
	if c != nil {
		// The server has not answered within the deadline: the
		// connection is stuck or the server is gone. Dropping it
		// unblocks a reader or sender using r's buffer, and the next
		// connection serves the other requests.
		img.connFailed(c, fmt.Errorf("%s %d+%d: no answer within %v", nbdwire.CmdName(r.cmd), r.off, r.length, img.opts.Timeout))
	}
	img.mu.Lock()
	// The caller may reuse its buffer once we return: wait until no
	// goroutine is reading or writing it.
	for r.claimed || r.sending > 0 {
		img.cond.Wait()
	}
	img.mu.Unlock()
	return img.errf("%s %d+%d: %w: %w", nbdwire.CmdName(r.cmd), r.off, r.length, ErrTimeout, unix.EIO)
}

// finishLocked answers r; mu is held.
func (img *Image) finishLocked(r *request, err error) {
	if r.finished {
		return
	}
	r.finished, r.err = true, err
	delete(img.pending, r.cookie)
	if err == nil && (r.cmd == nbdwire.CmdWrite || r.cmd == nbdwire.CmdWriteZeroes || r.cmd == nbdwire.CmdTrim) {
		// Counted at the acknowledgement, under the same lock a drop
		// takes, so no acknowledged write escapes the lost-write check.
		img.writeSeq++
	}
	close(r.done)
}

// failAllLocked finishes every pending request with err. The connections
// must already be closed: it waits (releasing mu) until no reader or sender
// still uses a request's buffer, since its caller may reuse the buffer as
// soon as the request is finished.
func (img *Image) failAllLocked(err error) {
	rs := make([]*request, 0, len(img.pending))
	for _, r := range img.pending {
		r.abandoned = true
		rs = append(rs, r)
	}
	clear(img.pending)
	for _, r := range rs {
		for r.claimed || r.sending > 0 {
			img.cond.Wait()
		}
		img.finishLocked(r, img.errf("%s: %w", nbdwire.CmdName(r.cmd), err))
	}
}

// connFailed drops c (once) and starts reconnecting if c was current.
func (img *Image) connFailed(c *conn, err error) {
	img.mu.Lock()
	if c.dead {
		img.mu.Unlock()
		return
	}
	c.dead = true
	c.nc.Close()
	closed := img.closed
	start := false
	if img.conn == c {
		img.conn = nil
		if img.writeSeq > img.flushedSeq && c.info.flags&nbdwire.TransSendFlush != 0 {
			img.lostWrites = true
		}
		if img.opts.noReconnect {
			img.broken = fmt.Errorf("%w: %w", ErrDisconnected, unix.EIO)
			img.failAllLocked(img.broken)
		} else if !closed && !img.reconnecting {
			img.reconnecting, start = true, true
			img.wg.Add(1)
		}
	}
	img.cond.Broadcast()
	img.mu.Unlock()
	if !closed {
		img.log.Warn("nbd connection dropped", "err", err)
	}
	if start {
		go img.reconnectLoop()
	}
}

// reconnectLoop connects again with exponential backoff until it
// succeeds or the image is closed, then sends every pending request on
// the new connection. Reads and writes are idempotent at block level, so
// sending one twice (once before the drop, once now) is harmless.
func (img *Image) reconnectLoop() {
	defer img.wg.Done()
	b := backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(20*time.Millisecond),
		backoff.WithMaxInterval(2*time.Second),
		backoff.WithMaxElapsedTime(0), // until Close: each request has its own deadline
	)
	attempt := 0
	op := func() error {
		attempt++
		c, err := img.connect(img.ctx)
		if err != nil {
			img.log.Debug("nbd reconnect failed", "attempt", attempt, "err", err)
			return err
		}
		if c.info.size != img.size {
			c.nc.Close()
			img.log.Error("nbd export changed size; not using it", "was", img.size, "now", c.info.size)
			return fmt.Errorf("export size changed from %d to %d", img.size, c.info.size)
		}
		img.install(c)
		img.log.Info("nbd reconnected", "attempt", attempt)
		return nil
	}
	if err := backoff.Retry(op, backoff.WithContext(b, img.ctx)); err != nil {
		img.mu.Lock()
		img.reconnecting = false
		img.mu.Unlock()
	}
}

// install makes c current and sends it every pending request.
func (img *Image) install(c *conn) {
	img.mu.Lock()
	if img.closed {
		img.reconnecting = false
		img.mu.Unlock()
		c.nc.Close()
		return
	}
	// A reader of a dead connection may still be filling a buffer; the
	// new reader must not start on the same request before it is done.
	for img.anyClaimedLocked() {
		img.cond.Wait()
	}
	img.conn = c
	img.info = c.info
	img.reconnecting = false
	resend := make([]*request, 0, len(img.pending))
	for _, r := range img.pending {
		if r.sentOn != c {
			r.sentOn = c
			r.sending++
			r.covered, r.chunkEr, r.extents = r.covered[:0], nil, nil
			resend = append(resend, r)
		}
	}
	img.wg.Add(1)
	img.mu.Unlock()
	go img.readLoop(c)
	// In cookie order, so the server sees the original submission order.
	slices.SortFunc(resend, func(a, b *request) int { return cmp.Compare(a.cookie, b.cookie) })
	for _, r := range resend {
		img.send(c, r)
	}
}

func (img *Image) anyClaimedLocked() bool {
	for _, r := range img.pending {
		if r.claimed {
			return true
		}
	}
	return false
}
