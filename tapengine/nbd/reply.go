package nbd

import (
	"encoding/binary"
	"fmt"
	"net"
	"slices"

	"github.com/blktap-go/blktap/internal/nbdwire"
)

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
	c.writeMu.Lock()
	if c.writing || len(c.pending) == 0 {
		c.writeMu.Unlock()
		return
	}
	c.writeLocked()
}

// send queues r's reply. Whoever finds no writer active becomes the writer
// and sends everything queued meanwhile in one writev per batch, so
// replies finishing together share a syscall and no goroutine exists just
// to write.
func (c *conn) send(r *req) {
	c.writeMu.Lock()
	if r.Type == nbdwire.CmdRead && r.Length >= ownSendMin && !r.holdReply && c.async == nil {
		// A big payload is sent by the worker that read it, on the CPU
		// whose cache holds it: handed to the writer at work, it was
		// copied into the socket from the other CPU's cache
		// (bench/profile.sh ours-dom0 read-1m-qd8). Only a pool worker
		// waits: the reader must go on reading (a client may not read
		// replies while its requests wait to be sent), and an
		// AsyncBackend's completer answers for every request.
		for c.writing {
			c.writerDone.Wait()
		}
	}
	c.pending = append(c.pending, r)
	if c.writing || (r.holdReply && len(c.pending) < maxDeferred) {
		// A writer will take it, or the reader kicks it out before it
		// next waits.
		c.writeMu.Unlock()
		return
	}
	c.writeLocked()
}

// writeLocked takes the writer role (writeMu held on entry, released on
// return) and writes until nothing is pending.
func (c *conn) writeLocked() {
	c.writing = true
	for len(c.pending) > 0 {
		batch := c.pending
		c.pending = c.spare[:0]
		failed := c.writeErr != nil
		c.writeMu.Unlock()
		err := c.writeBatch(batch, failed)
		c.writeMu.Lock()
		if err != nil && c.writeErr == nil {
			c.writeErr = err
		}
		clear(batch)
		c.spare = batch[:0]
	}
	c.writing = false
	c.writerDone.Broadcast()
	c.writeMu.Unlock()
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
		if c.tlsWriter != nil {
			err = c.writeTLS(iov)
		} else {
			c.writeBufs = iov
			_, err = c.writeBufs.WriteTo(c.nc)
		}
		clear(iov)
		c.iov, c.writeBufs = iov[:0], nil
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

// writeTLS writes iov through tlsWriter: 64 KiB writes (full 16 KiB TLS
// records) while the batch lasts, and one flush at its end.
func (c *conn) writeTLS(iov [][]byte) error {
	for _, b := range iov {
		if _, err := c.tlsWriter.Write(b); err != nil {
			return err
		}
	}
	return c.tlsWriter.Flush()
}

// streamRead serves a validated READ above MaxPayload: it takes the
// writer role for the whole reply and sends it a streamChunk at a time,
// read from the backend as it goes. With structured replies each part is
// its own data chunk, and a backend error is an error chunk; a simple
// reply cannot report an error once its data began, so the connection is
// closed instead, as the protocol requires.
func (c *conn) streamRead(r *req) {
	c.writeMu.Lock()
	for c.writing {
		c.writerDone.Wait()
	}
	c.writing = true
	failed := c.writeErr != nil
	c.writeMu.Unlock()

	var err error
	if !failed {
		err = c.streamReadParts(r)
	}
	c.release(r)
	c.writeMu.Lock()
	if err != nil && c.writeErr == nil {
		c.writeErr = err
	}
	if len(c.pending) > 0 {
		c.writeLocked() // replies queued while the stream had the socket
		return
	}
	c.writing = false
	c.writerDone.Broadcast()
	c.writeMu.Unlock()
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
	if c.tlsWriter != nil {
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
