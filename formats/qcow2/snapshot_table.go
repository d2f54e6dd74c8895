package qcow2

// Writing the snapshot table and the contiguous runs of clusters that
// snapshot L1 tables and the table itself need.

import (
	"encoding/binary"
	"fmt"
	"strconv"
	"time"
)

// snapExtraLen is the extra data we write for a new snapshot, qemu's
// current layout: vm_state_size_large, disk_size, icount.
const snapExtraLen = 24

// encodeSnapshots lays out a snapshot table (the layout readSnapshots
// parses).
func encodeSnapshots(snaps []Snapshot) ([]byte, error) {
	be := binary.BigEndian
	var out []byte
	for _, s := range snaps {
		if len(s.ID) > 0xffff || len(s.Name) > 0xffff {
			return nil, fmt.Errorf("qcow2: snapshot %q: id or name longer than 65535 bytes", s.Name)
		}
		var f [snapFixed]byte
		be.PutUint64(f[0:], uint64(s.L1Offset))
		be.PutUint32(f[8:], s.L1Size)
		be.PutUint16(f[12:], uint16(len(s.ID)))
		be.PutUint16(f[14:], uint16(len(s.Name)))
		sec, nsec := uint32(s.Date.Unix()), uint32(s.Date.Nanosecond())
		if s.Date.Equal(time.Unix(int64(s.dateSec), int64(s.dateNsec))) {
			sec, nsec = s.dateSec, s.dateNsec
		}
		be.PutUint32(f[16:], sec)
		be.PutUint32(f[20:], nsec)
		be.PutUint64(f[24:], s.VMClockNanos)
		be.PutUint32(f[32:], uint32(min(s.VMStateSize, 0xffffffff)))
		be.PutUint32(f[36:], uint32(len(s.extra)))
		out = append(out, f[:]...)
		out = append(out, s.extra...)
		out = append(out, s.ID...)
		out = append(out, s.Name...)
		for len(out)%8 != 0 {
			out = append(out, 0)
		}
	}
	if len(out) > maxSnapTable {
		return nil, fmt.Errorf("qcow2: snapshot table would exceed %d bytes", maxSnapTable)
	}
	return out, nil
}

// newSnapshotExtra is the extra data of a snapshot of a disk of size
// bytes: no VM state, no instruction count.
func newSnapshotExtra(size int64) []byte {
	b := make([]byte, snapExtraLen)
	binary.BigEndian.PutUint64(b[8:], uint64(size))
	return b
}

// nextSnapshotID is one more than the largest numeric ID, as qemu
// numbers snapshots.
func nextSnapshotID(snaps []Snapshot) string {
	var top uint64
	for _, s := range snaps {
		if n, err := strconv.ParseUint(s.ID, 10, 64); err == nil && n > top {
			top = n
		}
	}
	return strconv.FormatUint(top+1, 10)
}

// allocRunLocked reserves n contiguous free clusters (refcount 1, durable
// once the caller syncs) and returns the offset of the first. The file
// is extended over the run so no entry can point past its end.
func (img *Image) allocRunLocked(n int64) (int64, error) {
	m := &img.mu
	first, run := max(m.freeHint, 1), int64(0)
	for c := first; c < m.end && run < n; c++ {
		rc, err := img.refcountLocked(c)
		if err != nil {
			return 0, err
		}
		if rc != 0 || m.taken[c] {
			first, run = c+1, 0
			continue
		}
		run++
	}
	// Clusters from m.end on are free: a short run continues there.
	for c := first; c < first+n; c++ {
		if hit := img.overlapLocked(c<<img.cbits, img.cs, 0); hit != 0 {
			return 0, img.markCorruptLocked(c<<img.cbits, "refcount",
				"preventing invalid write on metadata: cluster %d holds the %v but its refcount is 0", c, hit)
		}
		m.taken[c] = true
	}
	m.end = max(m.end, first+n)
	for c := first; c < first+n; c++ {
		if err := img.setRefcountLocked(c, 1); err != nil {
			return 0, err
		}
	}
	if err := img.writeRefblocksLocked(); err != nil {
		return 0, err
	}
	if last := (first + n) << img.cbits; last > img.fileEnd.Load() {
		if err := img.f.Truncate(last); err != nil {
			return 0, fmt.Errorf("qcow2: %w", err)
		}
		img.grew(last)
	}
	return first << img.cbits, nil
}

// freeRunLocked drops one reference from each cluster of [off, off+n)
// bytes; the caller writes the refcount blocks.
func (img *Image) freeRunLocked(off, n int64) error {
	if n <= 0 {
		return nil
	}
	for c := off >> img.cbits; c <= (off+n-1)>>img.cbits; c++ {
		if err := img.decrefLocked(c); err != nil {
			return err
		}
	}
	return nil
}

// writeSnapshotTableLocked makes snaps the image's snapshot table: the
// new table is written and synced in clusters of its own, then the
// header's nb_snapshots and snapshots_offset change in one 12-byte write
// inside the first sector, synced, and only then is the old table freed.
// A crash leaves either table in force; the other is a leak.
func (img *Image) writeSnapshotTableLocked(snaps []Snapshot) error {
	raw, err := encodeSnapshots(snaps)
	if err != nil {
		return err
	}
	var off int64
	if len(raw) > 0 {
		if off, err = img.allocRunLocked((int64(len(raw)) + img.cs - 1) >> img.cbits); err != nil {
			return err
		}
		if err := img.writeMeta(raw, off, 0); err != nil {
			return err
		}
		if err := img.f.Sync(); err != nil {
			return err
		}
	}
	if err := img.switchHeaderLocked(60, uint32(len(snaps)), off); err != nil {
		return err
	}
	oldOff, oldLen := int64(img.hdr.snapshotsOffset), img.snapLen
	if img.hdr.nbSnapshots == 0 {
		oldLen = 0
	}
	img.snaps, img.snapLen = snaps, int64(len(raw))
	img.hdr.nbSnapshots, img.hdr.snapshotsOffset = uint32(len(snaps)), uint64(off)
	if err := img.freeRunLocked(oldOff, oldLen); err != nil {
		return err
	}
	return img.writeRefblocksLocked()
}

// switchHeaderLocked writes a count (u32) and the offset (u64) after it
// at header offset at (l1_size and l1_table_offset at 36, nb_snapshots
// and snapshots_offset at 60) in one 12-byte write inside the first
// sector, so a crash keeps the old pair or the new one, and syncs.
func (img *Image) switchHeaderLocked(at int64, n uint32, off int64) error {
	var hb [12]byte
	binary.BigEndian.PutUint32(hb[0:], n)
	binary.BigEndian.PutUint64(hb[4:], uint64(off))
	if err := img.writeMeta(hb[:], at, mHeader); err != nil {
		return err
	}
	return img.f.Sync()
}
