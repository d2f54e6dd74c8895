package qcow2

// Reference counting for snapshot operations: the references an L1 table
// makes, refcount changes checked whole before any is made, and the
// copied flags of the active tables kept equal to "refcount is 1".

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
			if le&l2Reserved != 0 || host&(img.cs-1) != 0 || host < img.cs || host>>img.cbits >= fileClusters {
				return corrupt(off+int64(j)*8, "l2_entry", "L2 entry %#x is not a valid data cluster", le)
			}
			d[host>>img.cbits] += sign
		}
	}
	return nil
}

// checkDeltasLocked verifies that the summed changes of ds leave every
// refcount between zero and the largest the image's refcount width holds,
// so an operation fails before its first write, never half way.
func (img *Image) checkDeltasLocked(ds ...map[int64]int64) error {
	sum := map[int64]int64{}
	for _, d := range ds {
		for c, v := range d {
			sum[c] += v
		}
	}
	top := img.maxRefcount()
	for c, v := range sum {
		rc, err := img.refcountLocked(c)
		if err != nil {
			return err
		}
		if v < 0 && rc < uint64(-v) {
			return corrupt(c<<img.cbits, "refcount", "cluster %d has refcount %d but %d references to it are being dropped (`%s` first)", c, rc, -v, RepairHint)
		}
		// Also each map on its own: they are applied one after another.
		for _, d := range ds {
			if dv := d[c]; dv > 0 && (uint64(dv) > top || rc > top-uint64(dv)) {
				return unsupported(c<<img.cbits, "refcount", "refcount of cluster %d would exceed %d, the most %d-bit refcounts hold", c, top, 1<<img.hdr.refcountOrder)
			}
		}
	}
	return nil
}

// applyDeltasLocked changes the refcounts by d (checked already), writes
// the refcount blocks and syncs. Clusters freed are punched out.
func (img *Image) applyDeltasLocked(d map[int64]int64) error {
	for c, v := range d {
		if v == 0 {
			continue
		}
		rc, err := img.refcountLocked(c)
		if err != nil {
			return err
		}
		nv := uint64(int64(rc) + v)
		if err := img.setRefcountLocked(c, nv); err != nil {
			return err
		}
		if nv == 0 {
			// Failure only costs space.
			_ = img.f.PunchHole(c<<img.cbits, img.cs)
		}
	}
	if err := img.writeRefblocksLocked(); err != nil {
		return err
	}
	return img.f.Sync()
}

// fixCopiedLocked gives every active L1 and L2 entry the copied flag
// exactly when its cluster's refcount is 1, writing each table that
// changes, then syncs. Compressed entries never carry the flag.
func (img *Image) fixCopiedLocked() error {
	m := &img.mu
	err := img.rewriteL2sLocked(m.l1, func(le uint64) (uint64, error) {
		if host := int64(le & offsetMask); le&entryCompressed == 0 && host != 0 {
			return img.withCopiedLocked(le, host)
		}
		return le, nil
	})
	if err != nil {
		return err
	}
	l1Changed := false
	for i, e := range m.l1 {
		if off := int64(e & offsetMask); off != 0 {
			ne, err := img.withCopiedLocked(e, off)
			if err != nil {
				return err
			}
			l1Changed = l1Changed || ne != e
			m.l1[i] = ne
		}
	}
	if l1Changed {
		if err := img.writeMeta(encodeTable(m.l1), int64(img.hdr.l1Offset), mL1); err != nil {
			return err
		}
	}
	return img.f.Sync()
}

// withCopiedLocked is entry e naming host offset off with the copied
// flag set if and only if that cluster's refcount is 1.
func (img *Image) withCopiedLocked(e uint64, off int64) (uint64, error) {
	rc, err := img.refcountLocked(off >> img.cbits)
	if err != nil {
		return 0, err
	}
	if rc == 1 {
		return e | entryCopied, nil
	}
	return e &^ entryCopied, nil
}

// clearCopiedLocked clears the copied flag in the L2 tables l1 names
// (about to be shared by two L1 tables), writing those that change, and
// syncs.
func (img *Image) clearCopiedLocked(l1 []uint64) error {
	err := img.rewriteL2sLocked(l1, func(le uint64) (uint64, error) { return le &^ entryCopied, nil })
	if err != nil {
		return err
	}
	return img.f.Sync()
}

// rewriteL2sLocked replaces each entry of the L2 tables l1 names by what
// f makes of it, writing every table that changes (cache included).
func (img *Image) rewriteL2sLocked(l1 []uint64, f func(uint64) (uint64, error)) error {
	for _, e := range l1 {
		off := int64(e & offsetMask)
		if off == 0 {
			continue
		}
		t, err := img.l2Locked(off)
		if err != nil {
			return err
		}
		ne := make([]uint64, len(t.e))
		changed := false
		for j, le := range t.e {
			if ne[j], err = f(le); err != nil {
				return err
			}
			changed = changed || ne[j] != le
		}
		if changed {
			if err := img.writeMeta(encodeTable(ne), t.off, mL2); err != nil {
				return err
			}
			copy(t.e, ne)
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
