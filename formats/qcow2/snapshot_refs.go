package qcow2

// The references an L1 table makes, as snapshot operations count them.

import (
	"encoding/binary"
)

// l2Reserved are the bits of a standard L2 entry that must be zero.
const l2Reserved = uint64(0x3f000000000001fe)

// reachLocked adds sign to d[c] for every reference l1 makes: each L2
// table once per L1 entry, each data or compressed cluster once per L2
// entry (Check counts the same way). Every table is read and checked
// here, before the caller writes anything.
func (img *Image) reachLocked(l1 []uint64, sign int64, d map[int64]int64) error {
	fileClusters := (img.fileEnd.Load() + img.cs - 1) >> img.cbits
	for i, e := range l1 {
		off := int64(e & offsetMask)
		if off == 0 {
			continue
		}
		if e&l1Reserved != 0 {
			return corrupt(-1, "l1_entry", "L1 entry %d (%#x) has reserved bits set", i, e)
		}
		// A table where other metadata lives would have the commit count
		// (and later write) that metadata as a table: refuse the image.
		if hit := img.overlapLocked(off, img.cs, mL2); hit != 0 {
			return corrupt(off, "l1_entry", "L1 entry %d names an L2 table at %#x, which holds the %v", i, off, hit)
		}
		t, err := img.l2Locked(off)
		if err != nil {
			return err
		}
		d[off>>img.cbits] += sign
		for j, le := range t.e {
			if le&entryCompressed != 0 {
				co, cn := img.compressedSpan(le)
				first, last := co>>img.cbits, (co+cn-1)>>img.cbits
				if co < img.cs || last >= fileClusters {
					return corrupt(off+int64(j)*8, "l2_entry", "compressed cluster at %#x is outside the file", co)
				}
				for c := first; c <= last; c++ {
					d[c] += sign
				}
				continue
			}
			host := int64(le & offsetMask)
			if host == 0 {
				continue
			}
			if le&l2Reserved != 0 || host&(img.cs-1) != 0 || host < img.cs || host>>img.cbits >= fileClusters ||
				img.metaAtLocked(host>>img.cbits) {
				return corrupt(off+int64(j)*8, "l2_entry", "L2 entry %#x is not a valid data cluster (misaligned, outside the file or on metadata)", le)
			}
			d[host>>img.cbits] += sign
		}
	}
	return nil
}

// encodeTable is an L1 or L2 table as stored.
func encodeTable(e []uint64) []byte {
	raw := make([]byte, len(e)*8)
	for i, v := range e {
		binary.BigEndian.PutUint64(raw[i*8:], v)
	}
	return raw
}
