package qcow2

// The commit of a snapshot operation: every structure that changes is
// written anew past the end of the allocated clusters, then one header
// write switches to all of them at once.
//
//	header bytes 36..71, one write inside the first sector:
//	+36 l1_size  +40 l1_table_offset  +48 refcount_table_offset
//	+56 refcount_table_clusters  +60 nb_snapshots  +64 snapshots_offset
//
// Before that write the old metadata is whole and the new clusters are
// free space no refcount counts; after it the new metadata is whole and
// counts the old clusters it stopped using as free. A crash leaves one
// image or the other, clean: no leak, no copied flag out of step with a
// refcount (the flag lives in a table, the count in a refcount block, and
// both are new copies switched together).

import (
	"encoding/binary"
	"fmt"
	"maps"
	"slices"
)

// txn is what a snapshot operation changes.
type txn struct {
	l1    []uint64         // the new active L1; 0 where l2 holds a new table
	l2    map[int][]uint64 // new active L2 tables by L1 index
	snaps []Snapshot       // the new snapshot table
	delta map[int64]int64  // refcount changes of clusters in use now
}

// planActiveLocked makes src (an L1 table's entries) the new active L1
// under the refcount changes delta: each copied flag says "refcount will
// be 1". An L2 table whose entries' flags must change is copied (its old
// cluster loses the active reference in delta), so no table in use now is
// written.
func (img *Image) planActiveLocked(src []uint64, delta map[int64]int64) (*txn, error) {
	t := &txn{l1: make([]uint64, len(src)), l2: map[int][]uint64{}, delta: delta}
	after := func(off int64) (uint64, error) {
		rc, err := img.refcountLocked(off >> img.cbits)
		return uint64(int64(rc) + delta[off>>img.cbits]), err
	}
	for i, e := range src {
		off := int64(e & offsetMask)
		if off == 0 {
			continue
		}
		tab, err := img.l2Locked(off)
		if err != nil {
			return nil, err
		}
		ne, changed := slices.Clone(tab.e), false
		for j, le := range tab.e {
			host := int64(le & offsetMask)
			if le&entryCompressed != 0 || host == 0 {
				continue
			}
			rc, err := after(host)
			if err != nil {
				return nil, err
			}
			if ne[j] = le &^ entryCopied; rc == 1 {
				ne[j] |= entryCopied
			}
			changed = changed || ne[j] != le
		}
		if changed {
			t.l2[i] = ne
			delta[off>>img.cbits]--
			continue
		}
		rc, err := after(off)
		if err != nil {
			return nil, err
		}
		if t.l1[i] = uint64(off); rc == 1 {
			t.l1[i] |= entryCopied
		}
	}
	return t, nil
}

// placement is where a commit puts its new clusters, from start on.
type placement struct {
	start, l1Off, stOff, refOff int64
	l2Off                       map[int]int64
	tc                          int64           // refcount table clusters
	blocks                      map[int64]int64 // refcount block index -> new offset
	all                         map[int64]int64 // every refcount change, frees included
	end                         int64           // first cluster past the new ones
}

// layoutLocked places the new L1, L2 tables, snapshot table, refcount
// table and refcount blocks, the last counting themselves: it repeats
// until the set of blocks to rewrite stops growing.
func (img *Image) layoutLocked(t *txn, stLen int64) *placement {
	m := &img.mu
	clus := func(n int64) int64 { return (n + img.cs - 1) >> img.cbits }
	lo := &placement{start: m.end, l2Off: map[int]int64{}}
	next := lo.start
	if len(t.l1) > 0 {
		lo.l1Off, next = next<<img.cbits, next+clus(int64(len(t.l1))*8)
	}
	for _, i := range slices.Sorted(maps.Keys(t.l2)) {
		lo.l2Off[i], next = next<<img.cbits, next+1
	}
	if stLen > 0 {
		lo.stOff, next = next<<img.cbits, next+clus(stLen)
	}
	base := maps.Clone(t.delta)
	for c := lo.start; c < next; c++ {
		base[c]++
	}
	// The old active L1, snapshot table and refcount table lose the
	// reference the header held.
	img.addSpan(base, int64(img.hdr.l1Offset), int64(len(m.l1))*8, -1)
	if img.hdr.nbSnapshots > 0 {
		img.addSpan(base, int64(img.hdr.snapshotsOffset), img.snapLen, -1)
	}
	img.addSpan(base, m.refOff, m.refClus*img.cs, -1)
	var nb int64
	for {
		lo.all = maps.Clone(base)
		for c := next; c < next+lo.tc+nb; c++ {
			lo.all[c]++
		}
		touched := img.blocksOf(lo.all)
		// Each block rewritten frees its old cluster, whose block is then
		// rewritten too.
		freed := map[int64]bool{}
		for grew := true; grew; {
			grew = false
			for _, r := range slices.Collect(maps.Keys(touched)) {
				if r >= int64(len(m.refTable)) || m.refTable[r] == 0 || freed[r] {
					continue
				}
				freed[r] = true
				oc := int64(m.refTable[r]&offsetMask) >> img.cbits
				lo.all[oc]--
				if !touched[oc>>img.rbBits] {
					touched[oc>>img.rbBits], grew = true, true
				}
			}
		}
		entries := max(int64(len(m.refTable)), slices.Max(slices.Collect(maps.Keys(touched)))+1)
		tc := clus(entries * 8)
		if tc == lo.tc && int64(len(touched)) == nb {
			break
		}
		lo.tc, nb = tc, int64(len(touched))
	}
	lo.refOff = next << img.cbits
	lo.blocks = map[int64]int64{}
	b := next + lo.tc
	for _, r := range slices.Sorted(maps.Keys(img.blocksOf(lo.all))) {
		lo.blocks[r], b = b<<img.cbits, b+1
	}
	lo.end = b
	return lo
}

// addSpan adds v to the references of each cluster of [off, off+n).
func (img *Image) addSpan(d map[int64]int64, off, n, v int64) {
	if n > 0 {
		for c := off >> img.cbits; c <= (off+n-1)>>img.cbits; c++ {
			d[c] += v
		}
	}
}

func (img *Image) blocksOf(d map[int64]int64) map[int64]bool {
	s := map[int64]bool{}
	for c := range d {
		s[c>>img.rbBits] = true
	}
	return s
}

// newRefcountsLocked builds the new refcount table and the blocks lo
// rewrites, refusing a count that would fall below zero or overflow.
func (img *Image) newRefcountsLocked(lo *placement) ([]uint64, map[int64][]byte, error) {
	m := &img.mu
	nt := make([]uint64, lo.tc*img.cs/8)
	copy(nt, m.refTable)
	blocks := map[int64][]byte{}
	for r, off := range lo.blocks {
		old, _, err := img.refblockLocked(r)
		if err != nil {
			return nil, nil, err
		}
		b := make([]byte, img.cs)
		copy(b, old)
		blocks[off], nt[r] = b, uint64(off)
	}
	top := img.maxRefcount()
	for c, v := range lo.all {
		b := blocks[lo.blocks[c>>img.rbBits]]
		i := c & (1<<img.rbBits - 1)
		rc := rcGet(b, i, img.hdr.refcountOrder)
		if v < 0 && rc < uint64(-v) {
			return nil, nil, corrupt(c<<img.cbits, "refcount", "cluster %d has refcount %d but %d references to it are being dropped (`%s` first)", c, rc, -v, RepairHint)
		}
		if v > 0 && (uint64(v) > top || rc > top-uint64(v)) {
			return nil, nil, unsupported(c<<img.cbits, "refcount", "refcount of cluster %d would exceed %d, the most %d-bit refcounts hold", c, top, 1<<img.hdr.refcountOrder)
		}
		rcSet(b, i, img.hdr.refcountOrder, uint64(int64(rc)+v))
	}
	return nt, blocks, nil
}

// commitLocked writes t where layoutLocked places it, syncs, switches the
// header, syncs, and then takes the new metadata into memory.
func (img *Image) commitLocked(t *txn) error {
	st, err := encodeSnapshots(t.snaps)
	if err != nil {
		return err
	}
	lo := img.layoutLocked(t, int64(len(st)))
	nt, blocks, err := img.newRefcountsLocked(lo)
	if err != nil {
		return err
	}
	for i, off := range lo.l2Off {
		t.l1[i] = uint64(off) | entryCopied
	}
	if err := img.writeNewLocked(t, lo, st, nt, blocks); err != nil {
		return err
	}
	var hb [36]byte
	be := binary.BigEndian
	be.PutUint32(hb[0:], uint32(len(t.l1)))
	be.PutUint64(hb[4:], uint64(lo.l1Off))
	be.PutUint64(hb[12:], uint64(lo.refOff))
	be.PutUint32(hb[20:], uint32(lo.tc))
	be.PutUint32(hb[24:], uint32(len(t.snaps)))
	be.PutUint64(hb[28:], uint64(lo.stOff))
	err = img.writeMeta(hb[:], 36, mHeader)
	if err == nil {
		err = img.f.Sync()
	}
	if err != nil {
		// The file may now name either metadata: this Image writes
		// nothing more (a fresh open reads whichever the disk holds).
		img.mu.broken = fmt.Errorf("qcow2: %s: snapshot commit failed, reopen the image: %w", img.path, err)
		return img.mu.broken
	}
	img.adoptLocked(t, lo, int64(len(st)), nt, blocks)
	return nil
}

// writeNewLocked writes every new structure into its fresh clusters and
// syncs; nothing in use points at them yet.
func (img *Image) writeNewLocked(t *txn, lo *placement, st []byte, nt []uint64, blocks map[int64][]byte) error {
	if end := lo.end << img.cbits; end > img.fileEnd.Load() {
		if err := img.f.Truncate(end); err != nil {
			return fmt.Errorf("qcow2: %w", err)
		}
		img.grew(end)
	}
	writes := map[int64][]byte{lo.refOff: encodeTable(nt)}
	if len(t.l1) > 0 {
		writes[lo.l1Off] = encodeTable(t.l1)
	}
	for i, off := range lo.l2Off {
		writes[off] = encodeTable(t.l2[i])
	}
	if len(st) > 0 {
		writes[lo.stOff] = st
	}
	maps.Copy(writes, blocks)
	for _, off := range slices.Sorted(maps.Keys(writes)) {
		if err := img.writeMeta(writes[off], off, 0); err != nil {
			return err
		}
	}
	return img.f.Sync()
}

// adoptLocked makes the committed metadata the image's in memory.
func (img *Image) adoptLocked(t *txn, lo *placement, stLen int64, nt []uint64, blocks map[int64][]byte) {
	m, h := &img.mu, img.hdr
	for r := range lo.blocks {
		if r < int64(len(m.refTable)) && m.refTable[r] != 0 {
			old := int64(m.refTable[r] & offsetMask)
			delete(m.blocks, old)
			delete(m.rbset, old>>img.cbits)
		}
	}
	for off, b := range blocks {
		m.blocks[off] = b
		m.rbset[off>>img.cbits] = struct{}{}
	}
	m.refTable, m.refOff, m.refClus = nt, lo.refOff, lo.tc
	h.refTableOffset, h.refTableClusters = uint64(lo.refOff), uint32(lo.tc)
	m.l1, h.l1Offset, h.l1Size = t.l1, uint64(lo.l1Off), uint32(len(t.l1))
	m.l2set = map[int64]struct{}{}
	for _, e := range t.l1 {
		if o := int64(e & offsetMask); o != 0 {
			m.l2set[o>>img.cbits] = struct{}{}
		}
	}
	m.l2 = map[int64]*l2Table{}
	m.lru.Init()
	img.snaps, img.snapLen = t.snaps, stLen
	h.nbSnapshots, h.snapshotsOffset = uint32(len(t.snaps)), uint64(lo.stOff)
	m.end = lo.end
	for c, v := range lo.all {
		if v < 0 {
			if rc, err := img.refcountLocked(c); err == nil && rc == 0 {
				m.freeHint = min(m.freeHint, c)
				// Failure only costs space.
				_ = img.f.PunchHole(c<<img.cbits, img.cs)
			}
		}
	}
}
