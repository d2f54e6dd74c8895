package nbd

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/internal/nbdwire"
)

// readLoop reads replies on c until it fails, matching each to its
// request by cookie.
func (img *Image) readLoop(c *conn) {
	defer img.wg.Done()
	var err error
	for err == nil {
		err = img.readReply(c)
	}
	img.connFailed(c, err)
}

// lookup finds the pending request a reply names; it must have been sent
// on c (a reply on the wrong connection is the server's fault).
func (img *Image) lookupLocked(c *conn, cookie uint64) (*request, error) {
	if c.dead {
		return nil, errors.New("connection closed")
	}
	r := img.pending[cookie]
	if r == nil || r.sentOn != c {
		return nil, protoErr("reply for cookie %d, which has no request in flight", cookie)
	}
	return r, nil
}

// readReply reads one simple reply or one structured chunk (layouts in
// internal/nbdwire), and a good READ's data after a simple reply.
func (img *Image) readReply(c *conn) error {
	var h [nbdwire.ChunkHeaderSize]byte
	if _, err := io.ReadFull(c.br, h[:4]); err != nil {
		return err
	}
	m := binary.BigEndian.Uint32(h[0:4])
	switch m {
	case nbdwire.MagicSimpleReply:
	case nbdwire.MagicChunkReply:
		if !c.info.structured {
			return protoErr("structured reply chunk without negotiating structured replies")
		}
	case nbdwire.MagicExtReply:
		return protoErr("extended-header reply, which we never negotiated")
	default:
		return protoErr("reply magic %#x", m)
	}
	n := nbdwire.ReplySize(m)
	if _, err := io.ReadFull(c.br, h[4:n]); err != nil {
		return err
	}
	r, err := nbdwire.ParseReply(h[:n])
	if err != nil {
		return protoErr("%v", err)
	}
	if r.Magic == nbdwire.MagicSimpleReply {
		return img.simpleReply(c, r.Error, r.Cookie)
	}
	return img.chunk(c, r.Flags, r.Type, r.Cookie, uint32(r.Length))
}

func (img *Image) simpleReply(c *conn, code uint32, cookie uint64) error {
	img.mu.Lock()
	r, err := img.lookupLocked(c, cookie)
	if err != nil {
		img.mu.Unlock()
		return err
	}
	if code != 0 {
		img.finishLocked(r, &ServerError{Cmd: nbdwire.CmdName(r.cmd), Code: code, Errno: errnoOf(code)})
		img.mu.Unlock()
		return nil
	}
	if r.cmd == nbdwire.CmdBlockStatus {
		img.mu.Unlock()
		return protoErr("simple reply to BLOCK_STATUS")
	}
	if r.cmd != nbdwire.CmdRead {
		img.finishLocked(r, nil)
		img.mu.Unlock()
		return nil
	}
	r.claimed = true
	img.mu.Unlock()
	_, err = io.ReadFull(c.br, r.buf)
	img.mu.Lock()
	defer img.mu.Unlock()
	r.claimed = false
	img.cond.Broadcast()
	if err != nil {
		return err
	}
	if !r.abandoned && r.sentOn == c {
		img.finishLocked(r, nil)
	}
	return nil
}

func (img *Image) chunk(c *conn, flags, typ uint16, cookie uint64, length uint32) error {
	img.mu.Lock()
	r, err := img.lookupLocked(c, cookie)
	if err != nil {
		img.mu.Unlock()
		return err
	}
	var perr error // a protocol error: the connection must go
	switch {
	case typ == nbdwire.ChunkNone:
		if length != 0 || flags&nbdwire.ChunkFlagDone == 0 {
			perr = protoErr("NONE chunk of %d bytes, flags %#x", length, flags)
		}
	case typ == nbdwire.ChunkOffsetData || typ == nbdwire.ChunkOffsetHole:
		if r.cmd != nbdwire.CmdRead {
			perr = protoErr("read data for %s", nbdwire.CmdName(r.cmd))
			break
		}
		r.claimed = true
		img.mu.Unlock()
		perr = img.readChunk(c, r, typ, length)
		img.mu.Lock()
		r.claimed = false
		img.cond.Broadcast()
	case typ == nbdwire.ChunkBlockStatus:
		if r.cmd != nbdwire.CmdBlockStatus {
			perr = protoErr("block status for %s", nbdwire.CmdName(r.cmd))
			break
		}
		img.mu.Unlock()
		ext, err := readBlockStatus(c, length)
		img.mu.Lock()
		if err != nil {
			perr = err
		} else if !r.abandoned && r.sentOn == c {
			r.extents = append(r.extents, ext...)
		}
	case typ&nbdwire.ChunkErrorBit != 0:
		img.mu.Unlock()
		serr, err := readErrorChunk(c, r.cmd, typ, length)
		img.mu.Lock()
		if err != nil {
			perr = err
		} else if r.chunkEr == nil {
			r.chunkEr = serr
		}
	default:
		perr = protoErr("unknown chunk type %d", typ)
	}
	if perr != nil {
		img.mu.Unlock()
		return perr
	}
	if flags&nbdwire.ChunkFlagDone != 0 && !r.abandoned && r.sentOn == c {
		img.finishLocked(r, img.replyResultLocked(r))
	}
	img.mu.Unlock()
	return nil
}

// replyResultLocked decides a structured reply's outcome at its DONE
// chunk: an error chunk wins; a read must have been covered exactly.
func (img *Image) replyResultLocked(r *request) error {
	if r.chunkEr != nil {
		return r.chunkEr
	}
	switch r.cmd {
	case nbdwire.CmdRead:
		slices.SortFunc(r.covered, func(a, b span) int { return cmp.Compare(a.off, b.off) })
		next := r.off
		for _, s := range r.covered {
			if s.off != next {
				break
			}
			next = s.end
		}
		if next != r.off+int64(r.length) {
			return img.errf("READ %d+%d: %w: the reply did not cover byte %d: %w",
				r.off, r.length, ErrProtocol, next, unix.EIO)
		}
	case nbdwire.CmdBlockStatus:
		if len(r.extents) == 0 {
			return img.errf("BLOCK_STATUS: %w: no extents: %w", ErrProtocol, unix.EIO)
		}
	}
	return nil
}

// readChunk reads an OFFSET_DATA or OFFSET_HOLE chunk into r's buffer;
// the caller has claimed r.
//
//	OFFSET_DATA: | u64 offset | data (length-8 bytes) |
//	OFFSET_HOLE: | u64 offset | u32 hole size |
func (img *Image) readChunk(c *conn, r *request, typ uint16, length uint32) error {
	var b [12]byte
	if length < 9 || (typ == nbdwire.ChunkOffsetHole && length != 12) {
		return protoErr("%d-byte chunk of type %d", length, typ)
	}
	n := 8
	if typ == nbdwire.ChunkOffsetHole {
		n = 12
	}
	if _, err := io.ReadFull(c.br, b[:n]); err != nil {
		return err
	}
	off := binary.BigEndian.Uint64(b[0:8])
	size := uint64(length) - 8
	if typ == nbdwire.ChunkOffsetHole {
		size = uint64(binary.BigEndian.Uint32(b[8:12]))
	}
	start, end := uint64(r.off), uint64(r.off)+uint64(r.length)
	if size == 0 || off < start || off > end || size > end-off {
		return protoErr("chunk for %d+%d outside READ %d+%d", off, size, r.off, r.length)
	}
	dst := r.buf[off-start : off-start+size]
	if typ == nbdwire.ChunkOffsetHole {
		clear(dst)
	} else if _, err := io.ReadFull(c.br, dst); err != nil {
		return err
	}
	for _, s := range r.covered {
		if int64(off) < s.end && s.off < int64(off+size) {
			return protoErr("READ chunks overlap at %d", off)
		}
	}
	r.covered = append(r.covered, span{int64(off), int64(off + size)})
	return nil
}

// readBlockStatus reads a BLOCK_STATUS chunk:
//
//	| u32 context id | { u32 length | u32 flags } ... |
func readBlockStatus(c *conn, length uint32) ([]bsExtent, error) {
	if length < 12 || (length-4)%8 != 0 || length > maxChunkMeta {
		return nil, protoErr("BLOCK_STATUS chunk of %d bytes", length)
	}
	b := make([]byte, length)
	if _, err := io.ReadFull(c.br, b); err != nil {
		return nil, err
	}
	if id := binary.BigEndian.Uint32(b[0:4]); !c.info.hasMeta || id != c.info.metaID {
		return nil, protoErr("block status for context %d, negotiated %d", id, c.info.metaID)
	}
	ext := make([]bsExtent, 0, (length-4)/8)
	for p := 4; p < len(b); p += 8 {
		e := bsExtent{binary.BigEndian.Uint32(b[p:]), binary.BigEndian.Uint32(b[p+4:])}
		if e.length == 0 {
			return nil, protoErr("zero-length block status extent")
		}
		ext = append(ext, e)
	}
	return ext, nil
}

// readErrorChunk reads an error chunk:
//
//	| u32 error | u16 message length | message | (ERROR_OFFSET: u64 offset) |
func readErrorChunk(c *conn, cmd uint16, typ uint16, length uint32) (*ServerError, error) {
	if length < 6 || length > maxChunkMeta {
		return nil, protoErr("error chunk of %d bytes", length)
	}
	b := make([]byte, length)
	if _, err := io.ReadFull(c.br, b); err != nil {
		return nil, err
	}
	code := binary.BigEndian.Uint32(b[0:4])
	mlen := int(binary.BigEndian.Uint16(b[4:6]))
	if mlen > len(b)-6 {
		return nil, protoErr("error message of %d bytes in a %d-byte chunk", mlen, length)
	}
	if code == 0 {
		// An error chunk must carry an error; treat it as EIO rather
		// than report success.
		code = 5
	}
	msg := string(b[6 : 6+mlen])
	if typ == nbdwire.ChunkErrorBit|2 && len(b)-6-mlen >= 8 {
		msg += fmt.Sprintf(" (at offset %d)", binary.BigEndian.Uint64(b[6+mlen:]))
	}
	return &ServerError{Cmd: nbdwire.CmdName(cmd), Code: code, Errno: errnoOf(code), Message: msg}, nil
}
