package qcow

import (
	"fmt"
	"slices"
)

// qcow v1 allocates only by appending, so a sound image never has data
// and metadata in one place; a damaged one can (an L2 entry naming an L2
// table, the header or the backing name). Every write or hole punch at a
// host offset read from a table is checked against the metadata first,
// and the first hit refuses writes for the rest of the session: the
// format has no corrupt bit to record it in the file.

// metaOverlapLocked names the metadata sharing a byte with [off, off+n),
// or returns "".
func (img *Image) metaOverlapLocked(off, n uint64) string {
	h := img.h
	hit := func(roff, rn uint64) bool { return rn > 0 && off < roff+rn && roff < off+n }
	hdrEnd := uint64(headerSize)
	if h.xen != nil {
		hdrEnd += xenHeaderSize
	}
	switch {
	case hit(0, hdrEnd):
		return "header"
	case h.backingOffset != 0 && hit(h.backingOffset, uint64(h.backingSize)):
		return "backing file name"
	case hit(h.l1Offset, uint64(h.l1Entries)*8):
		return "L1 table"
	}
	// The first table ending after off is the only one that can overlap
	// (tables never overlap each other: readL1 refuses that).
	tb := uint64(h.l2TableBytes)
	i, _ := slices.BinarySearchFunc(img.mu.l2offs, off, func(t, target uint64) int {
		if t+tb <= target {
			return -1
		}
		return 1
	})
	if i < len(img.mu.l2offs) && hit(img.mu.l2offs[i], tb) {
		return fmt.Sprintf("L2 table at %#x", img.mu.l2offs[i])
	}
	return ""
}

// refuseOverlapLocked fails (and from then on fails every write) when a
// write of n bytes at off for virtual cluster vc would land on metadata.
func (img *Image) refuseOverlapLocked(vc int64, off, n uint64, what string) error {
	if img.mu.broken != nil {
		return img.mu.broken
	}
	if m := img.metaOverlapLocked(off, n); m != "" {
		img.mu.broken = corrupt(-1, "l2 entry",
			"preventing invalid %s on metadata: cluster %d maps to %#x, which holds the %s; writes to this image are refused (`blktap image check` reports the damage)",
			what, vc, off, m)
		img.log.Error("qcow: refusing writes to a corrupt image", "path", img.path, "err", img.mu.broken)
		return img.mu.broken
	}
	return nil
}

// addL2Locked records a new L2 table's place.
func (img *Image) addL2Locked(off uint64) {
	i, found := slices.BinarySearch(img.mu.l2offs, off)
	if !found {
		img.mu.l2offs = slices.Insert(img.mu.l2offs, i, off)
	}
}

func (img *Image) brokenErr() error {
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.mu.broken
}
