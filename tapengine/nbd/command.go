package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/internal/nbdwire"
)

// handle runs one request and queues its reply.
func (c *conn) handle(r *req) {
	st := &c.s.stats
	switch r.Type {
	case nbdwire.CmdRead:
		st.reads.Add(1)
		if c.check(r) {
			c.read(r)
		}
	case nbdwire.CmdWrite:
		st.writes.Add(1)
		if c.check(r) {
			c.write(r)
		}
	case nbdwire.CmdFlush:
		st.flushes.Add(1)
		if c.check(r) {
			c.flush(r)
		}
	case nbdwire.CmdTrim:
		st.trims.Add(1)
		if c.check(r) {
			c.trim(r)
		}
	case nbdwire.CmdWriteZeroes:
		st.zeroes.Add(1)
		if c.check(r) {
			c.zero(r)
		}
	case nbdwire.CmdCache:
		// Advisory; the page cache already does what a prefetch would.
		if c.check(r) {
			c.replyOK(r)
		}
	case nbdwire.CmdBlockStatus:
		st.blockStatus.Add(1)
		if c.check(r) {
			c.blockStatus(r)
		}
	default:
		if c.check(r) {
			c.replyErr(r, nbdwire.ErrnoInval, fmt.Sprintf("unknown command %d", r.Type))
		}
	}
}

// check answers a request the export cannot serve as asked (bad flags,
// outside the export, a write to a read-only export, ...) with an error
// and reports whether it is fit to run.
func (c *conn) check(r *req) bool {
	errno, msg := c.refusal(r)
	if errno != 0 {
		c.replyErr(r, errno, msg)
	}
	return errno == 0
}

// refusal says why r cannot run, or 0.
func (c *conn) refusal(r *req) (errno uint32, msg string) {
	switch {
	case r.Flags&^c.allowedFlags(r.Type) != 0:
		return nbdwire.ErrnoInval, "unsupported command flags"
	case c.sess.extended && r.Flags&nbdwire.CmdFlagPayloadLen != 0 && r.Type != nbdwire.CmdWrite:
		// We do not advertise BLOCK_STATUS_PAYLOAD; the payload was
		// read and is dropped.
		return nbdwire.ErrnoInval, "unexpected payload"
	}
	switch r.Type {
	case nbdwire.CmdRead:
		switch {
		case r.Length > MaxStreamed:
			return nbdwire.ErrnoInval, "read longer than the maximum payload"
		case !c.inRange(r.Offset, r.Length):
			return nbdwire.ErrnoInval, "read past the end of the export"
		}
	case nbdwire.CmdWrite, nbdwire.CmdWriteZeroes:
		switch {
		case c.ro:
			return nbdwire.ErrnoPerm, "export is read-only"
		case !c.inRange(r.Offset, r.Length):
			return nbdwire.ErrnoNoSpace, "write past the end of the export"
		}
	case nbdwire.CmdTrim:
		switch {
		case c.ro:
			return nbdwire.ErrnoPerm, "export is read-only"
		case c.discarder == nil:
			return nbdwire.ErrnoInval, "trim not offered"
		case !c.inRange(r.Offset, r.Length):
			return nbdwire.ErrnoInval, "trim past the end of the export"
		}
	case nbdwire.CmdCache:
		if !c.inRange(r.Offset, r.Length) {
			return nbdwire.ErrnoInval, "cache past the end of the export"
		}
	}
	return 0, ""
}

// write runs a WRITE that passed check.
func (c *conn) write(r *req) {
	if err := writeAll(c.be, r.buf, int64(r.Offset)); err != nil {
		c.replyBackendErr(r, "write", err)
		return
	}
	c.s.stats.bytesWritten.Add(r.Length)
	c.finishWrite(r)
}

func (c *conn) flush(r *req) {
	if err := c.be.Flush(); err != nil {
		c.replyBackendErr(r, "flush", err)
		return
	}
	c.replyOK(r)
}

// trim runs a TRIM that passed check.
func (c *conn) trim(r *req) {
	if r.Length == 0 {
		c.replyOK(r)
		return
	}
	if err := c.discarder.Discard(int64(r.Offset), int64(r.Length)); err != nil {
		c.replyBackendErr(r, "trim", err)
		return
	}
	c.finishWrite(r)
}

// zero runs a WRITE_ZEROES that passed check.
func (c *conn) zero(r *req) {
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
	if c.zeroWriter != nil {
		err := c.zeroWriter.WriteZeroes(off, n, mayTrim)
		if !errors.Is(err, errors.ErrUnsupported) {
			return errno(err), err
		}
	}
	if mayTrim && c.discarder != nil {
		err := c.discarder.Discard(off, n)
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

// read answers a READ that passed check.
func (c *conn) read(r *req) {
	if r.Length > MaxPayload {
		c.streamRead(r)
		return
	}
	n := int(r.Length)
	if n == 0 {
		c.replyOK(r)
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
	exts := []image.Extent{{Offset: off, Length: length, Kind: image.Data}}
	if c.mapper != nil {
		var err error
		if exts, err = c.mapper.Map(off, length); err != nil {
			c.replyBackendErr(r, "map", err)
			return
		}
	}
	var ctxs [2]metaContext
	k := 0
	if c.sess.metaAlloc {
		ctxs[k] = metaContext{ctxBaseAllocation, allocFlags}
		k++
	}
	if c.sess.metaDepth {
		ctxs[k] = metaContext{ctxAllocDepth, depthFlags}
		k++
	}
	for i, cx := range ctxs[:k] {
		ds := descriptors(exts, off, off+length, cx.flags)
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
		c.appendBlockStatus(r, fl, cx.id, ds)
	}
	c.send(r)
}

// metaContext is a selected meta context: its id and its view of an
// extent.
type metaContext struct {
	id    uint32
	flags func(e image.Extent) uint32
}

// descriptor is one block status descriptor: a length and its flags.
type descriptor struct{ length, flags uint64 }

// descriptors turns the extents covering [off, end) into descriptors,
// merged where the flags agree, stopping at a gap in the map (reporting
// what is known) or at maxDescriptors.
func descriptors(exts []image.Extent, off, end int64, flags func(image.Extent) uint32) []descriptor {
	var ds []descriptor
	pos := off
	for _, e := range exts {
		if e.Offset > pos || e.Length <= 0 {
			break
		}
		t := min(e.Offset+e.Length, end)
		if t <= pos {
			continue
		}
		f := uint64(flags(e))
		if j := len(ds); j > 0 && ds[j-1].flags == f {
			ds[j-1].length += uint64(t - pos)
		} else {
			if len(ds) == maxDescriptors {
				break
			}
			ds = append(ds, descriptor{uint64(t - pos), f})
		}
		pos = t
		if pos == end {
			break
		}
	}
	return ds
}

// appendBlockStatus adds one context's block status chunk to r's reply.
func (c *conn) appendBlockStatus(r *req, flags uint16, id uint32, ds []descriptor) {
	if c.sess.extended {
		n := 8 + 16*len(ds)
		h := c.chunkHdr(r, flags, nbdwire.ChunkBlockStatusExt, n, n)
		h = binary.BigEndian.AppendUint32(h, id)
		h = binary.BigEndian.AppendUint32(h, uint32(len(ds)))
		for _, d := range ds {
			h = binary.BigEndian.AppendUint64(h, d.length)
			h = binary.BigEndian.AppendUint64(h, d.flags)
		}
		r.iov = append(r.iov, h)
		return
	}
	n := 4 + 8*len(ds)
	h := c.chunkHdr(r, flags, nbdwire.ChunkBlockStatus, n, n)
	h = binary.BigEndian.AppendUint32(h, id)
	for _, d := range ds {
		h = binary.BigEndian.AppendUint32(h, uint32(d.length))
		h = binary.BigEndian.AppendUint32(h, uint32(d.flags))
	}
	r.iov = append(r.iov, h)
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
