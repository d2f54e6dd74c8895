package ring

import (
	"errors"
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/tapengine/blkif"
)

// What a validated request does.
const (
	kindNone    uint8 = iota // answered without I/O (status decided)
	kindRead                 // read segments into granted pages
	kindWrite                // write segments from granted pages
	kindFlush                // flush only
	kindDiscard              // discard a range
)

// ioSeg is one segment resolved to its bytes in a granted page and its
// byte offset in the image.
type ioSeg struct {
	buf []byte
	off int64
}

// job is one request after validation: everything exec needs, in the
// backend's own memory. The guest can rewrite the ring slot from here on
// without effect.
type job struct {
	id          uint64
	op          uint8 // echoed in the response
	kind        uint8
	flushBefore bool // barrier: earlier writes durable before this one
	flushAfter  bool
	status      int16
	off, length int64 // discard
	bytes       uint64
	segs        []ioSeg
	inline      [blkif.SegmentsMax]ioSeg
	ind         []ioSeg   // indirect requests, allocated on first use
	copies      []CopySeg // a Copier's segments, allocated on first use
}

// errInvalid marks a request the frontend got wrong.
var errInvalid = errors.New("invalid request")

// prepare validates the request copied out of the ring into r and fills j.
// It never does I/O; it maps pages, which checks the grants. It reports
// false, counting nothing, when the transport had no mapping to spare
// (ErrPagesBusy): the caller releases the pages it holds and calls
// prepareReserved.
func (s *server) prepare(r *blkif.Request, j *job) bool {
	*j = job{id: r.ID, op: r.Op, ind: j.ind, copies: j.copies[:0]}
	j.segs = j.inline[:0]
	var err error
	switch r.Op {
	case blkif.OpRead, blkif.OpWrite, blkif.OpWriteBarrier, blkif.OpFlushDiskcache:
		err = s.prepareRW(r, j)
	case blkif.OpDiscard:
		err = s.prepareDiscard(r, j)
	case blkif.OpIndirect:
		err = s.prepareIndirect(r, j)
	default:
		s.count(r)
		s.stats.Unsupported.Add(1)
		j.status = blkif.StatusEOPNOTSUPP
		s.log.Debug("ring: unsupported op", "op", r.Op, "id", r.ID)
		return true
	}
	if errors.Is(err, ErrPagesBusy) && s.reserver != nil && !s.noWait {
		return false
	}
	s.count(r)
	if err != nil {
		j.kind = kindNone
		if errors.Is(err, errUnsupported) {
			s.stats.Unsupported.Add(1)
			j.status = blkif.StatusEOPNOTSUPP
		} else if errors.Is(err, ErrPagesBusy) {
			// Not the request's fault; respond counts the error.
			j.status = blkif.StatusError
		} else {
			s.stats.Invalid.Add(1)
			j.status = blkif.StatusError
		}
		s.log.Debug("ring: refused request", "op", blkif.OpName(r.Op), "id", r.ID, "err", err)
	}
	return true
}

// prepareReserved prepares a request that prepare left for want of
// mappings, once the loop holds no pages and every earlier request is
// answered and published: it reserves what the request needs (which may
// wait for other rings to release theirs), then maps. Without a
// reservation the request fails rather than waits again. If the loop is
// stopped meanwhile, the request goes back to the ring unanswered (an
// error would reach the guest as a failed I/O) and errStopped is
// returned.
func (s *server) prepareReserved(r *blkif.Request, j *job) error {
	if err := s.reserver.ReservePages(s.ctx, pagesOf(r, s.maxInd)); err != nil {
		if s.ctx.Err() != nil && s.back.Unconsume() {
			return errStopped
		}
		s.log.Warn("ring: no page mappings for a request", "op", blkif.OpName(r.Op), "id", r.ID, "err", err)
	}
	s.noWait = true
	s.prepare(r, j)
	s.noWait = false
	return nil
}

// pagesOf is how many data and indirect pages r can make the transport
// map; 0 for a request that will be refused before mapping anything.
func pagesOf(r *blkif.Request, maxInd int) int {
	switch r.Op {
	case blkif.OpRead, blkif.OpWrite, blkif.OpWriteBarrier, blkif.OpFlushDiskcache:
		if int(r.NrSegments) <= blkif.SegmentsMax {
			return int(r.NrSegments)
		}
	case blkif.OpIndirect:
		if n := int(r.IndirectSegments); n <= maxInd {
			return n + (n+blkif.SegmentsPerIndirect-1)/blkif.SegmentsPerIndirect
		}
	}
	return 0
}

// count adds r to the per-op counters, once per request however many
// times it is prepared.
func (s *server) count(r *blkif.Request) {
	switch r.Op {
	case blkif.OpRead:
		s.stats.Reads.Add(1)
	case blkif.OpWrite:
		s.stats.Writes.Add(1)
	case blkif.OpWriteBarrier:
		s.stats.Barriers.Add(1)
	case blkif.OpFlushDiskcache:
		s.stats.Flushes.Add(1)
	case blkif.OpDiscard:
		s.stats.Discards.Add(1)
	case blkif.OpIndirect:
		s.stats.Indirects.Add(1)
		if s.maxInd == 0 {
			return
		}
		switch r.IndirectOp {
		case blkif.OpRead:
			s.stats.Reads.Add(1)
		case blkif.OpWrite:
			s.stats.Writes.Add(1)
		}
	}
}

var errUnsupported = errors.New("unsupported")

func (s *server) prepareRW(r *blkif.Request, j *job) error {
	n := int(r.NrSegments)
	write := r.Op != blkif.OpRead
	switch r.Op {
	case blkif.OpWriteBarrier:
		j.flushBefore, j.flushAfter = true, true
	case blkif.OpFlushDiskcache:
		j.flushAfter = true
	}
	if n > blkif.SegmentsMax {
		return fmt.Errorf("%w: nr_segments %d > %d", errInvalid, n, blkif.SegmentsMax)
	}
	if n == 0 {
		if r.Op == blkif.OpRead || r.Op == blkif.OpWrite {
			return fmt.Errorf("%w: nr_segments 0", errInvalid)
		}
		// A barrier or flush without data: just the flush. A read-only
		// disk has nothing to flush.
		j.kind = kindFlush
		j.flushBefore, j.flushAfter = false, false
		if s.opts.ReadOnly {
			j.kind = kindNone
		}
		return nil
	}
	if write && s.opts.ReadOnly {
		return fmt.Errorf("%w: write to a read-only disk", errInvalid)
	}
	j.kind = kindRead
	if write {
		j.kind = kindWrite
	}
	return s.mapSegments(r.Seg[:n], r.Sector, write, j)
}

func (s *server) prepareDiscard(r *blkif.Request, j *job) error {
	if !s.opts.Discard {
		return fmt.Errorf("%w: discard not enabled", errUnsupported)
	}
	if r.Flag&blkif.DiscardSecure != 0 {
		// No image here can promise the old data is unrecoverable.
		return fmt.Errorf("%w: secure discard", errUnsupported)
	}
	if s.opts.ReadOnly {
		return fmt.Errorf("%w: discard on a read-only disk", errInvalid)
	}
	off, length, err := s.sectorRange(r.Sector, r.NrSectors)
	if err != nil {
		return err
	}
	j.kind, j.off, j.length = kindDiscard, off, length
	if length == 0 {
		j.kind = kindNone
	}
	return nil
}

func (s *server) prepareIndirect(r *blkif.Request, j *job) error {
	if s.maxInd == 0 {
		return fmt.Errorf("%w: indirect requests not enabled", errUnsupported)
	}
	var write bool
	switch r.IndirectOp {
	case blkif.OpRead:
	case blkif.OpWrite:
		write = true
	default:
		return fmt.Errorf("%w: indirect_op %d", errInvalid, r.IndirectOp)
	}
	// From here on the response carries the inner op, as blkfront expects.
	j.op = r.IndirectOp
	n := int(r.IndirectSegments)
	if n == 0 || n > s.maxInd {
		return fmt.Errorf("%w: indirect nr_segments %d not in [1, %d]", errInvalid, n, s.maxInd)
	}
	if write && s.opts.ReadOnly {
		return fmt.Errorf("%w: write to a read-only disk", errInvalid)
	}
	// Copy the segment descriptors out of the indirect pages once.
	segs := s.indSegs[:n]
	var err error
	if s.copier != nil {
		err = s.readIndirect(r, n, segs)
	} else {
		err = s.mapIndirect(r, n, segs)
	}
	if err != nil {
		return err
	}
	if cap(j.ind) < n {
		j.ind = make([]ioSeg, 0, s.maxInd)
	}
	j.segs = j.ind[:0]
	j.kind = kindRead
	if write {
		j.kind = kindWrite
	}
	return s.mapSegments(segs, r.Sector, write, j)
}

// mapIndirect maps an indirect request's descriptor pages and decodes its
// n segments into segs.
func (s *server) mapIndirect(r *blkif.Request, n int, segs []blkif.Segment) error {
	for p := 0; p*blkif.SegmentsPerIndirect < n; p++ {
		page, err := s.t.Page(r.IndirectGrefs[p], false)
		if err != nil {
			return fmt.Errorf("%w: indirect page %d (gref %d): %w", errInvalid, p, r.IndirectGrefs[p], err)
		}
		lo := p * blkif.SegmentsPerIndirect
		hi := min(n, lo+blkif.SegmentsPerIndirect)
		for i := lo; i < hi; i++ {
			blkif.DecodeSegment(page[(i-lo)*blkif.SegmentSize:], &segs[i])
		}
	}
	return nil
}

// sectorRange converts a 512-byte sector range to bytes, refusing any
// part of it past the end of the image (and any overflow on the way).
func (s *server) sectorRange(sector, count uint64) (off, length int64, err error) {
	last := uint64(s.size) / blkif.SectorSize
	if sector > last || count > last-sector {
		return 0, 0, fmt.Errorf("%w: sectors [%d, +%d) past the end (%d sectors)", errInvalid, sector, count, last)
	}
	return int64(sector) * blkif.SectorSize, int64(count) * blkif.SectorSize, nil
}

// mapSegments checks every segment and maps its page before any I/O, so a
// bad segment anywhere refuses the whole request untouched. Segments are
// consecutive on the disk from sector.
func (s *server) mapSegments(segs []blkif.Segment, sector uint64, write bool, j *job) error {
	var total uint64
	for i := range segs {
		sg := &segs[i]
		if sg.FirstSect > sg.LastSect || sg.LastSect >= blkif.SectorsPerPage {
			return fmt.Errorf("%w: segment %d sectors [%d, %d]", errInvalid, i, sg.FirstSect, sg.LastSect)
		}
		total += uint64(sg.LastSect-sg.FirstSect) + 1
	}
	off, _, err := s.sectorRange(sector, total)
	if err != nil {
		return err
	}
	j.bytes = total * blkif.SectorSize
	if s.copier != nil {
		s.copySegments(segs, off, j)
		return nil
	}
	for i := range segs {
		sg := &segs[i]
		// A read fills the guest's page, so it must be writable.
		page, err := s.t.Page(sg.Gref, !write)
		if err != nil {
			return fmt.Errorf("%w: segment %d (gref %d): %w", errInvalid, i, sg.Gref, err)
		}
		lo, hi := int(sg.FirstSect)*blkif.SectorSize, (int(sg.LastSect)+1)*blkif.SectorSize
		if len(page) < hi {
			return fmt.Errorf("%w: segment %d (gref %d): page of %d bytes", errInvalid, i, sg.Gref, len(page))
		}
		buf := page[lo:hi]
		if n := len(j.segs); n > 0 && extends(j.segs[n-1].buf, buf) {
			j.segs[n-1].buf = join(j.segs[n-1].buf, buf)
		} else {
			j.segs = append(j.segs, ioSeg{buf: buf, off: off})
		}
		off += int64(hi - lo)
	}
	return nil
}

// exec does the I/O of a prepared job and sets its status. Safe to run on
// several goroutines for different jobs.
func (s *server) exec(j *job) {
	if j.kind == kindNone {
		return
	}
	s.finish(j, s.do(j))
}

// finish sets a job's status from the outcome of its I/O and counts it.
func (s *server) finish(j *job, err error) {
	if err != nil {
		s.stats.Errors.Add(1)
		if errors.Is(err, ErrBadGrant) {
			s.stats.Invalid.Add(1)
			j.status = blkif.StatusError
			s.log.Debug("ring: refused request", "op", blkif.OpName(j.op), "id", j.id, "err", err)
			return
		}
		if j.kind == kindDiscard && unsupported(err) {
			// Linux blkfront turns discard off for the disk on
			// EOPNOTSUPP, and logs every other failure as an I/O error.
			j.status = blkif.StatusEOPNOTSUPP
			s.stats.Unsupported.Add(1)
			s.log.Info("ring: the image cannot discard", "id", j.id, "err", err)
			return
		}
		// Writes, barriers and flushes never answer EOPNOTSUPP: Linux
		// 6.1 blkfront completes such a barrier or flush as a success
		// (and turns flushes off), which would acknowledge a write the
		// image never took. No image reports a flush as unsupported.
		j.status = blkif.StatusError
		s.log.Warn("ring: I/O failed", "op", blkif.OpName(j.op), "id", j.id, "err", err)
		return
	}
	switch j.kind {
	case kindRead:
		s.stats.BytesRead.Add(j.bytes)
	case kindWrite:
		s.stats.BytesWritten.Add(j.bytes)
	}
}

// unsupported reports whether err says the image lacks the operation, as
// opposed to having failed at it.
func unsupported(err error) bool {
	return errors.Is(err, image.ErrUnsupported) || errors.Is(err, errors.ErrUnsupported)
}

func (s *server) do(j *job) error {
	copied := len(j.copies) > 0
	switch j.kind {
	case kindRead:
		if copied {
			return s.readCopied(j)
		}
		for _, sg := range j.segs {
			if n, err := s.img.ReadAt(sg.buf, sg.off); n != len(sg.buf) {
				return fmt.Errorf("read %d bytes at %d: got %d: %w", len(sg.buf), sg.off, n, err)
			}
		}
	case kindWrite:
		if j.flushBefore {
			if err := s.img.Flush(); err != nil {
				return fmt.Errorf("flush before barrier: %w", err)
			}
		}
		if err := s.writeSegs(j, copied); err != nil {
			return err
		}
		if j.flushAfter {
			if err := s.img.Flush(); err != nil {
				return fmt.Errorf("flush: %w", err)
			}
		}
	case kindFlush:
		if err := s.img.Flush(); err != nil {
			return fmt.Errorf("flush: %w", err)
		}
	case kindDiscard:
		if err := s.img.Discard(j.off, j.length); err != nil {
			return fmt.Errorf("discard %d bytes at %d: %w", j.length, j.off, err)
		}
	}
	return nil
}

func (s *server) writeSegs(j *job, copied bool) error {
	if copied {
		return s.writeCopied(j)
	}
	for _, sg := range j.segs {
		if n, err := s.img.WriteAt(sg.buf, sg.off); err != nil || n != len(sg.buf) {
			return fmt.Errorf("write %d bytes at %d: wrote %d: %w", len(sg.buf), sg.off, n, err)
		}
	}
	return nil
}

// ordered reports whether a job must not overlap any other: flushes and
// barriers cover every write answered before them.
func (j *job) ordered() bool {
	return j.kind == kindFlush || j.flushBefore || j.flushAfter
}
