package qcow2

import (
	"encoding/binary"
	"fmt"
	"sort"
	"strings"
)

// Overlap checks, after qemu's "cached" set: before any metadata is
// written, and before a cluster is handed out for data, the target is
// compared with every metadata structure whose location is known without
// reading the file (header, active L1, active L2 tables, refcount table
// and blocks, snapshot table, snapshot L1 tables). A hit means the
// refcounts or tables lie about the layout; writing anyway would destroy
// metadata, so the write is refused and the image marked corrupt.

// metaKind is a set of metadata structures.
type metaKind uint16

const (
	mHeader metaKind = 1 << iota
	mL1
	mL2
	mRefTable
	mRefBlock
	mSnapTable
	mSnapL1
)

var metaNames = [...]string{"header", "active L1 table", "active L2 table", "refcount table",
	"refcount block", "snapshot table", "snapshot L1 table"}

func (k metaKind) String() string {
	var names []string
	for i, n := range metaNames {
		if k&(1<<i) != 0 {
			names = append(names, n)
		}
	}
	return strings.Join(names, ", ")
}

// RepairHint is how a corrupt image is repaired with our tool; every
// refusal caused by the corrupt bit names it.
const RepairHint = "blktap image check --repair"

// overlapLocked returns the metadata other than ignore that shares a host
// cluster with [off, off+n). It runs for every read and write of an
// allocated cluster, so it only consults memory and allocates nothing.
func (img *Image) overlapLocked(off, n int64, ignore metaKind) metaKind {
	if n <= 0 {
		return 0
	}
	m := &img.mu
	first, last := off>>img.cbits, (off+n-1)>>img.cbits
	var hit metaKind
	if first == 0 {
		hit |= mHeader
	}
	if img.spans(first, last, int64(img.hdr.l1Offset), int64(len(m.l1))*8) {
		hit |= mL1
	}
	if img.spans(first, last, m.refOff, m.refClus*img.cs) {
		hit |= mRefTable
	}
	if len(img.snaps) > 0 {
		if img.spans(first, last, int64(img.hdr.snapshotsOffset), img.snapLen) {
			hit |= mSnapTable
		}
		if ignore&mSnapL1 == 0 {
			for _, s := range img.snaps {
				if img.spans(first, last, s.L1Offset, int64(s.L1Size)*8) {
					hit |= mSnapL1
					break
				}
			}
		}
	}
	if ignore&mL2 == 0 && inSet(m.l2set, first, last) {
		hit |= mL2
	}
	if ignore&mRefBlock == 0 && inSet(m.rbset, first, last) {
		hit |= mRefBlock
	}
	return hit &^ ignore
}

// metaAtLocked reports whether host cluster c holds metadata: the check
// on every request that maps to an allocated cluster, so the sets (the
// likeliest hits) are asked first and a miss costs little.
func (img *Image) metaAtLocked(c int64) bool {
	if _, ok := img.mu.l2set[c]; ok {
		return true
	}
	if _, ok := img.mu.rbset[c]; ok {
		return true
	}
	return img.overlapLocked(c<<img.cbits, img.cs, mL2|mRefBlock) != 0
}

// spans reports whether the host clusters first..last meet [off, off+n).
func (img *Image) spans(first, last, off, n int64) bool {
	return n > 0 && first <= (off+n-1)>>img.cbits && last >= off>>img.cbits
}

// inSet reports whether a cluster of first..last is in s, in time bounded
// by the smaller of the range and the set (a grown refcount table spans
// many clusters).
func inSet(s map[int64]struct{}, first, last int64) bool {
	if last-first < int64(len(s)) {
		for c := first; c <= last; c++ {
			if _, ok := s[c]; ok {
				return true
			}
		}
		return false
	}
	for c := range s {
		if c >= first && c <= last {
			return true
		}
	}
	return false
}

// refuseOverlapLocked is the check before a write of kind k at off.
func (img *Image) refuseOverlapLocked(off, n int64, k metaKind, what string) error {
	if hit := img.overlapLocked(off, n, k); hit != 0 {
		return img.markCorruptLocked(off, what, "preventing invalid write on metadata: %d bytes at %#x overlap the %v", n, off, hit)
	}
	return nil
}

// markCorruptLocked records a broken invariant. On a writable image the
// corrupt bit (incompatible feature bit 1) is set and synced, so neither
// we nor qemu open the image for writing until it is repaired, and every
// later write or discard of this Image fails with the same error. Version
// 2 images have no feature bits: the refusal lasts until Close.
func (img *Image) markCorruptLocked(off int64, field, format string, args ...any) error {
	err := corrupt(off, field, format+"; image marked corrupt, repair it with `"+RepairHint+"`", args...)
	if img.ro || img.checkOnly {
		return err
	}
	m := &img.mu
	if m.broken != nil {
		return err
	}
	m.broken = err
	img.log.Error("qcow2: marking image as corrupt", "path", img.path, "err", err)
	if img.hdr.version < 3 || img.hdr.incompatible&incCorrupt != 0 {
		return err
	}
	img.hdr.incompatible |= incCorrupt
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], img.hdr.incompatible)
	// Straight to the file: the header is the one place this write goes.
	if _, werr := img.f.WriteAt(b[:], 72); werr != nil {
		img.log.Error("qcow2: could not set the corrupt bit", "path", img.path, "err", werr)
	} else if serr := img.f.Sync(); serr != nil {
		img.log.Error("qcow2: could not sync the corrupt bit", "path", img.path, "err", serr)
	}
	return err
}

// clearCorruptLocked drops the corrupt bit after a repair left the image
// clean.
func (img *Image) clearCorruptLocked() error {
	if img.hdr.incompatible&incCorrupt == 0 {
		return nil
	}
	img.hdr.incompatible &^= incCorrupt
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], img.hdr.incompatible)
	if err := img.writeMeta(b[:], 72, mHeader); err != nil {
		return err
	}
	return img.f.Sync()
}

// checkLayoutLocked verifies on open that the metadata structures whose
// places the header, L1 table, refcount table and snapshot table give
// do not share clusters. Only in-memory tables are consulted: it costs
// no I/O.
func (img *Image) checkLayoutLocked() error {
	m := &img.mu
	type span struct {
		first, last int64 // host clusters, inclusive
		k           metaKind
	}
	var spans []span
	add := func(k metaKind, off, n int64) {
		if n > 0 {
			spans = append(spans, span{off >> img.cbits, (off + n - 1) >> img.cbits, k})
		}
	}
	add(mHeader, 0, img.cs)
	add(mL1, int64(img.hdr.l1Offset), int64(len(m.l1))*8)
	add(mRefTable, m.refOff, m.refClus*img.cs)
	if len(img.snaps) > 0 {
		add(mSnapTable, int64(img.hdr.snapshotsOffset), img.snapLen)
		for _, s := range img.snaps {
			add(mSnapL1, s.L1Offset, int64(s.L1Size)*8)
		}
	}
	for c := range m.l2set {
		add(mL2, c<<img.cbits, img.cs)
	}
	for c := range m.rbset {
		add(mRefBlock, c<<img.cbits, img.cs)
	}
	sort.Slice(spans, func(i, j int) bool { return spans[i].first < spans[j].first })
	for i := 1; i < len(spans); i++ {
		p, s := spans[i-1], spans[i]
		if s.first <= p.last {
			return fmt.Errorf("%v and %v share host cluster %d", p.k, s.k, s.first)
		}
		if p.last > s.last {
			spans[i] = p // keep the longest reach for the next comparison
		}
	}
	return nil
}
