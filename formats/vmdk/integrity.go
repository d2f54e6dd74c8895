package vmdk

import (
	"fmt"
	"slices"
	"sort"

	"github.com/blktap-go/blktap/formats/image"
)

// A writable sparse extent keeps the byte ranges of its metadata (header,
// embedded descriptor, grain directories, grain tables), sorted. On open
// they must not overlap one another; a grain a table names must not
// overlap any of them, or writing the grain would rewrite metadata. New
// tables and grains go past the end of everything, which is checked too.

// metaSpan is one metadata structure of an extent.
type metaSpan struct {
	start, end int64 // bytes, end exclusive
	what       string
}

// buildMeta lists the extent's metadata and refuses overlaps.
func (s *sparse) buildMeta() error {
	h := s.h
	spans := []metaSpan{{0, sectorSize, "header"}}
	add := func(sec, n uint64, what string) {
		if sec != 0 && n != 0 {
			spans = append(spans, metaSpan{int64(sec) * sectorSize, int64(sec)*sectorSize + int64(n), what})
		}
	}
	add(h.DescOffset, h.DescSize*sectorSize, "descriptor")
	n := uint64(len(s.gd)) * 4
	add(h.GDOffset, n, "grain directory")
	if s.rgd != nil {
		add(h.RGDOffset, n, "redundant grain directory")
	}
	gt := h.gtSectors() * sectorSize
	for _, dir := range [][]uint32{s.gd, s.rgd} {
		for _, sec := range dir {
			add(uint64(sec), gt, "grain table")
		}
	}
	sort.Slice(spans, func(i, j int) bool { return spans[i].start < spans[j].start })
	for i := 1; i < len(spans); i++ {
		p, c := spans[i-1], spans[i]
		if c.start < p.end {
			return fmtErr(c.start, "metadata", image.ErrCorrupt, "%s: the %s at sector %d overlaps the %s at sector %d",
				s.name, c.what, c.start/sectorSize, p.what, p.start/sectorSize)
		}
	}
	s.meta = spans
	return nil
}

// metaOverlapLocked names the metadata overlapping [off, off+n), or "".
func (s *sparse) metaOverlapLocked(off, n int64) string {
	// Spans are sorted and disjoint: only the first ending after off can
	// start before off+n.
	i := sort.Search(len(s.meta), func(i int) bool { return s.meta[i].end > off })
	if i < len(s.meta) && s.meta[i].start < off+n {
		return fmt.Sprintf("%s at sector %d", s.meta[i].what, s.meta[i].start/sectorSize)
	}
	return ""
}

// checkGrainLocked refuses grain g at off when it overlaps metadata.
func (s *sparse) checkGrainLocked(g uint64, off int64) error {
	if m := s.metaOverlapLocked(off, s.h.grainBytes()); m != "" {
		return fmtErr(-1, "grain table", image.ErrCorrupt,
			"%s: preventing invalid write on metadata: grain %d at sector %d overlaps the %s", s.name, g, off/sectorSize, m)
	}
	return nil
}

// addMetaLocked records a new grain table placed at off.
func (s *sparse) addMetaLocked(off int64) {
	sp := metaSpan{off, off + int64(s.h.gtSectors())*sectorSize, "grain table"}
	i := sort.Search(len(s.meta), func(i int) bool { return s.meta[i].start >= off })
	s.meta = slices.Insert(s.meta, i, sp)
}
