package nbd

import (
	"io"
	"slices"

	"github.com/blktap-go/blktap/internal/nbdwire"
)

// startable reports whether the reader should start rq on the backend.
func (c *conn) startable(rq Request) bool {
	if c.async == nil || rq.Length == 0 || rq.Length > MaxPayload || rq.Offset%512 != 0 || rq.Length%512 != 0 {
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

// handleAsync runs a READ or WRITE the reader found startable: checked,
// counted, and started on the async backend, its reply held back like an
// inline request's.
func (c *conn) handleAsync(r *req) {
	r.holdReply = true
	if r.Type == nbdwire.CmdRead {
		c.s.stats.reads.Add(1)
	} else {
		c.s.stats.writes.Add(1)
	}
	if c.check(r) {
		c.start(r)
	}
}

// start starts a validated READ or WRITE in parts of up to partMax bytes;
// the part cookies are the request's index and, in the high half, the
// part's number. The last part to finish answers the request.
func (c *conn) start(r *req) {
	parts := int32((r.Length + c.partMax - 1) / c.partMax)
	r.partsLeft.Store(parts)
	r.firstErr = nil
	c.unfinished.Add(1)
	c.started.Add(1)
	if r.Type == nbdwire.CmdRead {
		if c.lendable(r.Request) && c.takeTags(r, int(parts)) {
			r.lent = true
			r.lentData = slices.Grow(r.lentData[:0], int(parts))[:parts]
		} else {
			r.buf, r.bufp = getBuf(int(r.Length))
		}
	}
	for i := range parts {
		off := uint64(i) * c.partMax
		n := min(c.partMax, r.Length-off)
		cookie := uint64(r.idx) | uint64(i)<<32
		var err error
		switch {
		case r.Type == nbdwire.CmdRead && r.lent:
			err = c.async.StartTagRead(r.tags[i], int64(r.Offset+off), int(n), c, cookie)
		case r.Type == nbdwire.CmdRead:
			err = c.async.StartRead(int64(r.Offset+off), int(n), c, cookie)
		case r.lent:
			err = c.async.StartTagWrite(r.tags[i], int64(r.Offset+off), int(n), c, cookie)
		default:
			err = c.async.StartWrite(r.buf[off:off+n], int64(r.Offset+off), c, cookie)
		}
		if err != nil {
			// The parts from i on never start.
			c.partsDone(r, parts-i, err)
			return
		}
	}
}

// takeTags takes one of the backend's buffers per part of a READ. If the
// backend has none to give (it is closing), it gives back what it took
// and reports false: the read then goes through a buffer of its own.
func (c *conn) takeTags(r *req, parts int) bool {
	for range parts {
		h, _, err := c.async.TakeTag()
		if err != nil {
			for _, h := range r.tags {
				c.async.PutTag(h)
			}
			r.tags = r.tags[:0]
			return false
		}
		r.tags = append(r.tags, h)
	}
	return true
}

// Complete finishes one part of a started request (Completer; on the
// backend's goroutine). The reply waits for CompleteBatch.
func (c *conn) Complete(cookie uint64, data []byte, err error) {
	r := c.reqs[uint32(cookie)]
	if err == nil && r.Type == nbdwire.CmdRead {
		if r.lent {
			r.lentData[cookie>>32] = data
		} else {
			copy(r.buf[(cookie>>32)*c.partMax:], data)
		}
	}
	c.partsDone(r, 1, err)
}

// partsDone accounts k parts of r as finished and answers r after its
// last one.
func (c *conn) partsDone(r *req, k int32, err error) {
	r.errMu.Lock()
	if r.firstErr == nil {
		r.firstErr = err
	}
	r.errMu.Unlock()
	if r.partsLeft.Add(-k) != 0 {
		return
	}
	c.started.Add(-1)
	r.errMu.Lock()
	err = r.firstErr
	r.errMu.Unlock()
	r.holdReply = true
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
	c.unfinished.Done()
}

// CompleteBatch sends the replies of a batch of completions in one write.
func (c *conn) CompleteBatch() { c.kick() }

// readLent reads a WRITE's payload into tags taken from the backend, one
// per part. If the backend is gone (no tag to give), it gives back what
// it took and reports false: the payload is then read into a buffer of
// the request's own, to stay in frame, and the request fails when
// started.
func (c *conn) readLent(r *req, plen uint64) (bool, error) {
	for off := uint64(0); off < plen; off += c.partMax {
		h, buf, err := c.async.TakeTag()
		if err != nil {
			for _, h := range r.tags {
				c.async.PutTag(h)
			}
			r.tags, r.lent = r.tags[:0], false
			return false, nil
		}
		r.tags, r.lent = append(r.tags, h), true
		n := min(c.partMax, plen-off)
		if _, err := io.ReadFull(c.br, buf[:n]); err != nil {
			return true, err
		}
	}
	return true, nil
}
