package qcow2

// Refcount blocks and the table naming them: reading, setting, growing
// the table, finding free clusters and writing dirty blocks back.

import (
	"encoding/binary"
	"fmt"

	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// ---- refcounts -------------------------------------------------------------

// rcGet reads refcount i of a block holding 2^order-bit entries. Entries
// narrower than a byte fill each byte from its least significant bit.
func rcGet(b []byte, i int64, order uint32) uint64 {
	switch order {
	case 0, 1, 2:
		bits := int64(1) << order
		per := 8 / bits
		return uint64(b[i/per]>>((i%per)*bits)) & (1<<bits - 1)
	case 3:
		return uint64(b[i])
	case 4:
		return uint64(binary.BigEndian.Uint16(b[i*2:]))
	case 5:
		return uint64(binary.BigEndian.Uint32(b[i*4:]))
	default:
		return binary.BigEndian.Uint64(b[i*8:])
	}
}

func rcSet(b []byte, i int64, order uint32, v uint64) {
	switch order {
	case 0, 1, 2:
		bits := int64(1) << order
		per := 8 / bits
		sh := (i % per) * bits
		mask := byte(1<<bits-1) << sh
		b[i/per] = b[i/per]&^mask | byte(v<<sh)&mask
	case 3:
		b[i] = byte(v)
	case 4:
		binary.BigEndian.PutUint16(b[i*2:], uint16(v))
	case 5:
		binary.BigEndian.PutUint32(b[i*4:], uint32(v))
	default:
		binary.BigEndian.PutUint64(b[i*8:], v)
	}
}

func (img *Image) maxRefcount() uint64 {
	if img.hdr.refcountOrder == 6 {
		return ^uint64(0)
	}
	return 1<<(1<<img.hdr.refcountOrder) - 1
}

// refblockLocked returns refcount block r, or nil if it has none.
func (img *Image) refblockLocked(r int64) ([]byte, int64, error) {
	m := &img.mu
	if r >= int64(len(m.refTable)) {
		return nil, 0, nil
	}
	e := m.refTable[r]
	if e == 0 {
		return nil, 0, nil
	}
	off := int64(e & offsetMask)
	if b, ok := m.blocks[off]; ok {
		return b, off, nil
	}
	if e&^offsetMask != 0 || off == 0 || off&(img.cs-1) != 0 {
		return nil, 0, corrupt(m.refOff+r*8, "refcount_table", "entry %d (%#x) is not a cluster-aligned offset", r, e)
	}
	if fe := img.fileEnd.Load(); off+img.cs > fe {
		return nil, 0, corrupt(m.refOff+r*8, "refcount_table", "refcount block %d at %#x ends past the end of the file (%d)", r, off, fe)
	}
	b := make([]byte, img.cs)
	if err := hostfile.ReadFull(img.f, b, off); err != nil {
		return nil, 0, fmt.Errorf("qcow2: read refcount block at %#x: %w", off, err)
	}
	m.blocks[off] = b
	return b, off, nil
}

// refcountLocked is the stored refcount of host cluster c.
func (img *Image) refcountLocked(c int64) (uint64, error) {
	b, _, err := img.refblockLocked(c >> img.rbBits)
	if err != nil || b == nil {
		return 0, err
	}
	return rcGet(b, c&(1<<img.rbBits-1), img.hdr.refcountOrder), nil
}

// setRefcountLocked sets the refcount of host cluster c in memory, creating
// its refcount block (and growing the table) as needed. The block is
// written by writeRefblocksLocked.
func (img *Image) setRefcountLocked(c int64, v uint64) error {
	if v > img.maxRefcount() {
		return corrupt(-1, "refcount", "refcount of cluster %d would overflow %d bits", c, 1<<img.hdr.refcountOrder)
	}
	r := c >> img.rbBits
	if err := img.ensureRefblockLocked(r); err != nil {
		return err
	}
	b, off, err := img.refblockLocked(r)
	if err != nil {
		return err
	}
	if b == nil {
		return corrupt(img.mu.refOff+r*8, "refcount_table", "entry %d names no refcount block", r)
	}
	rcSet(b, c&(1<<img.rbBits-1), img.hdr.refcountOrder, v)
	img.mu.dirtyRB[off] = struct{}{}
	delete(img.mu.taken, c)
	if v == 0 && c < img.mu.freeHint {
		img.mu.freeHint = c
	}
	return nil
}

func (img *Image) decrefLocked(c int64) error {
	rc, err := img.refcountLocked(c)
	if err != nil {
		return err
	}
	if rc == 0 {
		return corrupt(c*img.cs, "refcount", "cluster %d is freed but its refcount is already 0", c)
	}
	return img.setRefcountLocked(c, rc-1)
}

// ensureRefblockLocked gives range r a refcount block. The block goes in
// the first free cluster; when that cluster lies in range r the block
// counts itself. Its content is durable before the table points to it.
func (img *Image) ensureRefblockLocked(r int64) error {
	m := &img.mu
	if r >= int64(len(m.refTable)) {
		if err := img.growRefTableLocked(r + 1); err != nil {
			return err
		}
	}
	if m.refTable[r] != 0 {
		return nil
	}
	x, _, err := img.takeFreeLocked()
	if err != nil {
		return err
	}
	blk := make([]byte, img.cs)
	self := x>>img.rbBits == r
	if self {
		rcSet(blk, x&(1<<img.rbBits-1), img.hdr.refcountOrder, 1)
	} else {
		if err := img.setRefcountLocked(x, 1); err != nil {
			return err
		}
		if err := img.writeRefblocksLocked(); err != nil {
			return err
		}
	}
	off := x << img.cbits
	// Not yet in rbset: checked against every structure, refcount
	// blocks included.
	if err := img.writeMeta(blk, off, 0); err != nil {
		return err
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	var e [8]byte
	binary.BigEndian.PutUint64(e[:], uint64(off))
	if err := img.writeMeta(e[:], m.refOff+r*8, mRefTable); err != nil {
		return err
	}
	m.refTable[r] = uint64(off)
	m.blocks[off] = blk
	m.rbset[x] = struct{}{}
	delete(m.taken, x)
	return nil
}

// growRefTableLocked moves the refcount table to the end of the file with
// room for at least minEntries blocks. The new table and the blocks that
// count it are written and synced, then the header is switched (one
// 12-byte write inside the first sector) and synced, then the old table
// is freed.
func (img *Image) growRefTableLocked(minEntries int64) error {
	m := &img.mu
	start := m.end
	entries := max(minEntries, 2*int64(len(m.refTable)))
	var tc, k, first, last int64
	for {
		tc = (entries*8 + img.cs - 1) / img.cs
		k = 0
		for {
			first, last = start>>img.rbBits, (start+tc+k-1)>>img.rbBits
			need := int64(0)
			for r := first; r <= last; r++ {
				if r >= int64(len(m.refTable)) || m.refTable[r] == 0 {
					need++
				}
			}
			if need == k {
				break
			}
			k = need
		}
		if last < entries {
			break
		}
		entries = last + 1
	}
	if tc*img.cs > maxRefTable {
		return unsupported(-1, "refcount_table", "image would need a refcount table over %d bytes", maxRefTable)
	}
	nt := make([]uint64, tc*img.cs/8)
	copy(nt, m.refTable)
	next := start + tc
	for r := first; r <= last; r++ {
		if nt[r] == 0 {
			off := next << img.cbits
			nt[r] = uint64(off)
			m.blocks[off] = make([]byte, img.cs)
			m.rbset[next] = struct{}{}
			next++
		}
	}
	oldOff, oldClus := m.refOff, m.refClus
	m.refTable = nt
	m.end = next
	for c := start; c < next; c++ {
		if err := img.setRefcountLocked(c, 1); err != nil {
			return err
		}
	}
	if err := img.writeRefblocksLocked(); err != nil {
		return err
	}
	raw := make([]byte, tc*img.cs)
	for i, e := range nt {
		binary.BigEndian.PutUint64(raw[i*8:], e)
	}
	if err := img.writeMeta(raw, start<<img.cbits, mRefTable); err != nil {
		return err
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	var hb [12]byte
	binary.BigEndian.PutUint64(hb[:], uint64(start<<img.cbits))
	binary.BigEndian.PutUint32(hb[8:], uint32(tc))
	if err := img.writeMeta(hb[:], 48, mHeader); err != nil {
		return err
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	m.refOff, m.refClus = start<<img.cbits, tc
	img.hdr.refTableOffset, img.hdr.refTableClusters = uint64(m.refOff), uint32(tc)
	for c := oldOff >> img.cbits; c < (oldOff>>img.cbits)+oldClus; c++ {
		if err := img.setRefcountLocked(c, 0); err != nil {
			return err
		}
	}
	return nil
}

// takeFreeLocked finds the lowest free host cluster (refcount 0) and
// marks it taken in the allocator (the caller sets its refcount).
func (img *Image) takeFreeLocked() (int64, bool, error) {
	m := &img.mu
	for {
		var c int64
		if m.freeHint < m.end {
			c = m.freeHint
			m.freeHint++
		} else {
			c = m.end
			m.end++
			m.freeHint = m.end
		}
		if m.usedRefs != nil && c < int64(len(m.usedRefs)) && m.usedRefs[c] > 0 {
			continue
		}
		if c == 0 || m.taken[c] {
			continue
		}
		rc, err := img.refcountLocked(c)
		if err != nil {
			return 0, false, err
		}
		if rc != 0 {
			continue
		}
		// A free refcount on a cluster that holds metadata: the refcounts
		// are wrong, and handing the cluster out would overwrite it.
		if hit := img.overlapLocked(c<<img.cbits, img.cs, 0); hit != 0 {
			return 0, false, img.markCorruptLocked(c<<img.cbits, "refcount",
				"preventing invalid write on metadata: cluster %d holds the %v but its refcount is 0", c, hit)
		}
		if m.usedRefs != nil && c < int64(len(m.usedRefs)) {
			m.usedRefs[c] = 1 // the caller gives it refcount 1
		}
		// Until the caller sets its refcount, nothing may take c again,
		// even if a free (the old refcount table after growth) moves
		// freeHint back below it.
		m.taken[c] = true
		return c, c<<img.cbits >= img.fileEnd.Load(), nil
	}
}

// writeRefblocksLocked writes every refcount block changed in memory.
func (img *Image) writeRefblocksLocked() error {
	for off := range img.mu.dirtyRB {
		if err := img.writeMeta(img.mu.blocks[off], off, mRefBlock); err != nil {
			return err
		}
		delete(img.mu.dirtyRB, off)
	}
	return nil
}

// writeMeta writes metadata of kind k (the structures the write may
// touch) and tracks the file's end. A write that would land on metadata
// of another kind is refused and marks the image corrupt.
func (img *Image) writeMeta(p []byte, off int64, k metaKind) error {
	if img.mu.broken != nil {
		// Nothing more is written into metadata found to be lying (a
		// refcount block dirtied before the refusal included).
		return img.mu.broken
	}
	if err := img.refuseOverlapLocked(off, int64(len(p)), k, "metadata_write"); err != nil {
		return err
	}
	if _, err := img.f.WriteAt(p, off); err != nil {
		return fmt.Errorf("qcow2: write metadata at %#x: %w", off, err)
	}
	img.grew(off + int64(len(p)))
	return nil
}

func (img *Image) grew(end int64) {
	for {
		cur := img.fileEnd.Load()
		if end <= cur || img.fileEnd.CompareAndSwap(cur, end) {
			return
		}
	}
}
