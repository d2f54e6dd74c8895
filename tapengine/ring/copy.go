package ring

import (
	"fmt"

	"github.com/blktap-go/blktap/tapengine/blkif"
)

// Grant copy (a Copier transport): a request's segments become CopySegs
// and its data one buffer, so the image sees one ReadAt or WriteAt per
// request and the transport one copy call.

func (s *server) initCopy(c Copier) {
	s.copier = c
	most := max(blkif.SegmentsMax, s.maxInd) * blkif.PageSize
	s.bufs.New = func() any { b := make([]byte, most); return &b }
	if s.maxInd > 0 {
		pages := (s.maxInd + blkif.SegmentsPerIndirect - 1) / blkif.SegmentsPerIndirect
		s.indBuf = make([]byte, pages*blkif.PageSize)
	}
}

// copySegments is mapSegments for a Copier: the segments (already
// checked) become j.copies, and j.segs one range of the image whose
// buffer doCopied supplies.
func (s *server) copySegments(segs []blkif.Segment, off int64, j *job) {
	if cap(j.copies) < len(segs) {
		j.copies = make([]CopySeg, 0, max(blkif.SegmentsMax, s.maxInd))
	}
	j.copies = j.copies[:0]
	for i := range segs {
		sg := &segs[i]
		lo, hi := int(sg.FirstSect)*blkif.SectorSize, (int(sg.LastSect)+1)*blkif.SectorSize
		j.copies = append(j.copies, CopySeg{Ref: sg.Gref, Off: uint16(lo), Len: uint16(hi - lo)})
	}
	j.segs = append(j.segs[:0], ioSeg{off: off})
}

// readIndirect copies the descriptors of an indirect request's n segments
// out of its indirect pages (one copy call) and decodes them into segs.
func (s *server) readIndirect(r *blkif.Request, n int, segs []blkif.Segment) error {
	var cs [blkif.IndirectPagesMax]CopySeg
	pages := (n + blkif.SegmentsPerIndirect - 1) / blkif.SegmentsPerIndirect
	for p := range pages {
		k := min(n-p*blkif.SegmentsPerIndirect, blkif.SegmentsPerIndirect)
		cs[p] = CopySeg{Ref: r.IndirectGrefs[p], Len: uint16(k * blkif.SegmentSize)}
	}
	buf := s.indBuf[:n*blkif.SegmentSize]
	if err := s.copier.CopyIn(cs[:pages], buf); err != nil {
		return fmt.Errorf("%w: indirect pages: %w", errInvalid, err)
	}
	for i := range segs[:n] {
		blkif.DecodeSegment(buf[i*blkif.SegmentSize:], &segs[i])
	}
	return nil
}

// readCopied is do's read for a job whose data moves by copy: success
// only once the guest's pages hold all of it.
func (s *server) readCopied(j *job) error {
	bp := s.bufs.Get().(*[]byte)
	defer s.bufs.Put(bp)
	buf, off := (*bp)[:j.bytes], j.segs[0].off
	if n, err := s.img.ReadAt(buf, off); n != len(buf) {
		return fmt.Errorf("read %d bytes at %d: got %d: %w", len(buf), off, n, err)
	}
	if err := s.copier.CopyOut(j.copies, buf); err != nil {
		return fmt.Errorf("copy %d bytes to the guest: %w", len(buf), err)
	}
	return nil
}

// writeCopied is do's write (between its flushes) for a job whose data
// moves by copy: all of it is in the buffer before any reaches the image.
func (s *server) writeCopied(j *job) error {
	bp := s.bufs.Get().(*[]byte)
	defer s.bufs.Put(bp)
	buf, off := (*bp)[:j.bytes], j.segs[0].off
	if err := s.copier.CopyIn(j.copies, buf); err != nil {
		return fmt.Errorf("copy %d bytes from the guest: %w", len(buf), err)
	}
	if n, err := s.img.WriteAt(buf, off); err != nil || n != len(buf) {
		return fmt.Errorf("write %d bytes at %d: wrote %d: %w", len(buf), off, n, err)
	}
	return nil
}
