package frontend

import (
	"fmt"
	"io"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/tapengine/blkif"
)

// Blocking calls: ReadAt, WriteAt, Flush and Discard return once the
// backend has answered every request they made. Each enters (holding
// life's read side, so Close cannot unmap under it), takes tags, submits
// and waits on each tag's done channel, where the reaper puts the status.

// enter admits a call: connected, not closed; it holds life.RLock until
// leave.
func (f *Frontend) enter() (size int64, ro bool, err error) {
	f.life.RLock()
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case f.closed:
		err = f.closeErr
	case !f.connected:
		err = ErrNotConnected
	}
	if err != nil {
		f.life.RUnlock()
	}
	return f.size, f.readOnly, err
}

func (f *Frontend) leave() { f.life.RUnlock() }

// wait waits for tag id's response and turns its status into an error.
// On error the tag is not given back if the request may still be in
// flight (the frontend is closing and will never reuse it).
func (f *Frontend) wait(id uint16, op uint8) error {
	var st int16
	select {
	case st = <-f.tags[id].done:
	case <-f.closedCh:
		// The response may have raced the close; prefer it.
		select {
		case st := <-f.tags[id].done:
			if st == blkif.StatusOK {
				return nil
			}
		default:
		}
		return f.closeErr
	}
	return statusErr(st, op)
}

// transfer moves the bytes of one ReadAt or WriteAt call (or one half of
// a read-modify-write) through the ring: p is the caller's side, holding
// the disk's bytes [off, off+len(p)). It goes in chunks of up to f.chunk
// bytes over the enclosing sectors, as many in flight as tags allow.
type transfer struct {
	f   *Frontend
	op  uint8 // blkif.OpRead or blkif.OpWrite
	p   []byte
	off int64
	err error // the first failure; no chunk is started after it
}

// chunk is one request of a transfer: its tag and the sector-aligned
// disk range it covers.
type chunk struct {
	id  uint16
	off int64
	n   int
}

// rw runs a transfer of op between p and the disk at off. Reads may be
// unaligned (the enclosing sectors are read, the wanted part copied);
// writes must cover whole sectors.
func (f *Frontend) rw(op uint8, p []byte, off int64) error {
	x := transfer{f: f, op: op, p: p, off: off}
	// The chunks in flight, oldest first. Most calls have a few: the
	// queue lives in rw's frame, not in x, so those stay off the heap.
	var inline [4]chunk
	queue := inline[:0]
	alo, ahi := off&^(sector-1), (off+int64(len(p))+sector-1)&^(sector-1)
	for coff := alo; coff < ahi && x.err == nil; {
		n := int(min(int64(f.chunk), ahi-coff))
		var id uint16
		var err error
		id, queue, err = x.takeTag(queue)
		if err != nil {
			x.err = err
			break
		}
		c := chunk{id: id, off: coff, n: n}
		if op == blkif.OpWrite {
			user, pages := x.overlap(c)
			copy(pages, user)
		}
		if err := f.submit(id, op, coff, n, false); err != nil {
			f.giveBack(id, err)
			x.err = err
			break
		}
		queue = append(queue, c)
		coff += int64(n)
	}
	for _, c := range queue {
		x.finish(c)
	}
	return x.err
}

// takeTag takes a free tag, waiting for this transfer's own oldest chunk
// in queue rather than for another caller's tag while it holds some:
// that is what keeps big calls from deadlocking each other. It returns
// what is left of queue.
func (x *transfer) takeTag(queue []chunk) (uint16, []chunk, error) {
	for {
		select {
		case id := <-x.f.free:
			return id, queue, nil
		default:
		}
		if len(queue) == 0 {
			id, err := x.f.acquire()
			return id, queue, err
		}
		x.finish(queue[0])
		queue = queue[1:]
	}
}

// finish waits for chunk c's response, copies a read's bytes out and
// gives its tag back.
func (x *transfer) finish(c chunk) {
	err := x.f.wait(c.id, x.op)
	if err == nil && x.op == blkif.OpRead {
		user, pages := x.overlap(c)
		copy(user, pages)
	}
	x.f.giveBack(c.id, err)
	if err != nil && x.err == nil {
		x.err = err
	}
}

// overlap returns the part of the caller's bytes and the part of chunk
// c's pages that hold the same disk bytes.
func (x *transfer) overlap(c chunk) (user, pages []byte) {
	lo := max(c.off, x.off)
	hi := min(c.off+int64(c.n), x.off+int64(len(x.p)))
	return x.p[lo-x.off : hi-x.off], x.f.tags[c.id].mem[lo-c.off : hi-c.off]
}

// ReadAt reads len(p) bytes of the guest's disk at off. Reads past the end
// return the bytes up to it and io.EOF.
func (f *Frontend) ReadAt(p []byte, off int64) (int, error) {
	size, _, err := f.enter()
	if err != nil {
		return 0, err
	}
	defer f.leave()
	if off < 0 {
		return 0, fmt.Errorf("frontend: negative offset %d", off)
	}
	if off >= size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	want := p
	if int64(len(p)) > size-off {
		want = p[:size-off]
	}
	if len(want) == 0 {
		return 0, nil
	}
	if err := f.rw(blkif.OpRead, want, off); err != nil {
		return 0, err
	}
	if len(want) < len(p) {
		return len(want), io.EOF
	}
	return len(p), nil
}

// WriteAt writes p to the guest's disk at off; it returns once the backend
// has answered every request (the data is in the image).
func (f *Frontend) WriteAt(p []byte, off int64) (int, error) {
	size, ro, err := f.enter()
	if err != nil {
		return 0, err
	}
	defer f.leave()
	if ro {
		return 0, ErrReadOnly
	}
	if err := image.CheckRange(off, len(p), size); err != nil {
		return 0, fmt.Errorf("frontend: %w", err)
	}
	if len(p) == 0 {
		return 0, nil
	}
	end := off + int64(len(p))
	// Split into an unaligned head, an aligned middle and an unaligned
	// tail; head and tail are empty when their end is aligned.
	headEnd := off
	if off&(sector-1) != 0 {
		headEnd = min(end, (off+sector-1)&^(sector-1))
		if err := f.rmwRange(p[:headEnd-off], off); err != nil {
			return 0, err
		}
	}
	tailStart := max(headEnd, end&^(sector-1))
	if headEnd < tailStart {
		if err := f.rw(blkif.OpWrite, p[headEnd-off:tailStart-off], headEnd); err != nil {
			return 0, err
		}
	}
	if tailStart < end {
		if err := f.rmwRange(p[tailStart-off:], tailStart); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// rmwRange writes b at off, where [off, off+len(b)) lies within at most
// two sectors and is not sector-aligned: read the sectors, patch, write.
func (f *Frontend) rmwRange(b []byte, off int64) error {
	f.rmw.Lock()
	defer f.rmw.Unlock()
	alo, ahi := off&^(sector-1), (off+int64(len(b))+sector-1)&^(sector-1)
	buf := make([]byte, ahi-alo)
	if err := f.rw(blkif.OpRead, buf, alo); err != nil {
		return err
	}
	copy(buf[off-alo:], b)
	return f.rw(blkif.OpWrite, buf, alo)
}

// Flush asks the backend to make every completed write durable
// (BLKIF_OP_FLUSH_DISKCACHE) and waits for its answer.
func (f *Frontend) Flush() error {
	if _, _, err := f.enter(); err != nil {
		return err
	}
	defer f.leave()
	return f.single(blkif.OpFlushDiskcache, 0, 0)
}

// single runs one request that carries no data.
func (f *Frontend) single(op uint8, off int64, n int) error {
	id, err := f.acquire()
	if err != nil {
		return err
	}
	if err := f.submit(id, op, off, n, false); err != nil {
		f.giveBack(id, err)
		return err
	}
	err = f.wait(id, op)
	f.giveBack(id, err)
	return err
}

// maxDiscard keeps a discard request's byte count in an int.
const maxDiscard = 1 << 30

// Discard tells the backend [off, off+length) is no longer needed
// (BLKIF_OP_DISCARD); afterwards the range reads as zeros. Partial
// sectors at either end are written with zeros instead, and so is the
// whole range when the backend did not publish feature-discard (slow but
// true to the contract: NBD's WRITE_ZEROES falls back on Discard).
func (f *Frontend) Discard(off, length int64) error {
	size, ro, err := f.enter()
	if err != nil {
		return err
	}
	if ro {
		f.leave()
		return ErrReadOnly
	}
	if err := image.CheckRange64(off, length, size); err != nil {
		f.leave()
		return fmt.Errorf("frontend: discard: %w", err)
	}
	end := off + length
	lo, hi := (off+sector-1)&^(sector-1), end&^(sector-1)
	if lo >= hi || !f.features.Discard {
		f.leave()
		return f.writeZeros(off, length)
	}
	for o := lo; o < hi; o += maxDiscard {
		if err := f.single(blkif.OpDiscard, o, int(min(maxDiscard, hi-o))); err != nil {
			f.leave()
			return err
		}
	}
	f.leave()
	// The edges, after leaving: WriteAt enters on its own.
	if err := f.writeZeros(off, lo-off); err != nil {
		return err
	}
	return f.writeZeros(hi, end-hi)
}

// zeroChunk bounds the buffer writeZeros allocates.
const zeroChunk = 1 << 20

// writeZeros writes zeros over [off, off+n) in chunks.
func (f *Frontend) writeZeros(off, n int64) error {
	if n <= 0 {
		return nil
	}
	zeros := make([]byte, min(n, zeroChunk))
	for n > 0 {
		k := min(n, zeroChunk)
		if _, err := f.WriteAt(zeros[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}
