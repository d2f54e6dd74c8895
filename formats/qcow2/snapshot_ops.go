package qcow2

// Internal snapshots: create, apply (revert to) and delete, as
// `qemu-img snapshot -c|-a|-d` does them.
//
// A snapshot is an L1 table of its own plus a reference on every L2 table
// and data cluster that L1 reaches: refcounts count references per L1
// path, as Check counts them. Entries of the active tables whose cluster
// has a refcount above one lose the copied flag, so the write path
// copies before it writes (write.go: allocWrite, writableL2Locked).
//
// # Write order
//
// Each operation reads and checks everything it will touch before its
// first write, and raises refcounts before anything new refers to them:
//
//	create  1. new L1 copy (fresh clusters)  2. refcounts +1 on what the
//	        active L1 reaches, sync  3. copied flags of the active tables
//	        cleared, sync  4. new snapshot table, sync, header, sync
//	apply   1. refcounts +1 on what the snapshot reaches, sync
//	        2. copied flags of its tables cleared, sync  3. new active L1
//	        (fresh clusters), sync  4. header l1_size + l1_table_offset in
//	        one 12-byte write, sync  5. refcounts -1 on what the old active
//	        L1 reached, old L1 freed, sync
//	delete  1. new snapshot table without it, sync, header, sync
//	        2. refcounts -1 on what it reached, its L1 freed, sync
//	        3. copied flags of the active tables set where refcount is 1
//
// A crash anywhere leaves refcounts at or above the true references
// (leaks), never below, and never a copied flag on a cluster two tables
// share. Create and delete each have one window qemu-img check reports
// as an OFLAG_COPIED error although no data is at risk: during create
// step 3 (refcount 2, flag still set, one reference: a leak) and between
// delete steps 2 and 3 (refcount 1, flag still clear: writes copy
// needlessly). The flag lives in a table and the count in a refcount
// block, two sectors no single write covers. `qemu-img check -r leaks`
// and Check with RepairLeaks repair both.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// ErrNoSnapshot: no snapshot has the ID or name asked for.
var ErrNoSnapshot = errors.New("snapshot not found")

// beginSnapshotOp takes the image for a snapshot operation: no request in
// flight, queued frees applied and every earlier write durable.
func (img *Image) beginSnapshotOp() (func(), error) {
	img.io.Lock()
	img.mu.Lock()
	unlock := func() { img.mu.Unlock(); img.io.Unlock() }
	var err error
	switch {
	case img.mu.closed:
		err = image.ErrClosed
	case img.ro || img.checkOnly:
		err = image.ErrReadOnly
	case img.mu.broken != nil:
		err = img.mu.broken
	}
	if err == nil {
		err = img.applyFreesLocked()
	}
	if err == nil {
		err = img.f.Sync()
	}
	if err != nil {
		unlock()
		return nil, err
	}
	// A packed compressed cluster may change hands below: start a new one.
	img.mu.zc, img.mu.zused = 0, 0
	return unlock, nil
}

// CreateSnapshot records the disk as it is now as a new internal
// snapshot named name (names need not be unique, as in qemu), dated now.
func (img *Image) CreateSnapshot(name string, now time.Time) (Snapshot, error) {
	unlock, err := img.beginSnapshotOp()
	if err != nil {
		return Snapshot{}, err
	}
	defer unlock()
	m := &img.mu
	if len(img.snaps) >= maxSnapshots {
		return Snapshot{}, unsupported(60, "nb_snapshots", "the image already has %d snapshots, the most qemu opens", len(img.snaps))
	}
	if len(name) > 0xffff {
		return Snapshot{}, fmt.Errorf("qcow2: snapshot name longer than 65535 bytes")
	}
	d := map[int64]int64{}
	if err := img.reachLocked(m.l1, 1, d); err != nil {
		return Snapshot{}, err
	}
	if err := img.checkDeltasLocked(d); err != nil {
		return Snapshot{}, err
	}
	now = now.UTC().Truncate(time.Microsecond) // what qemu stores
	sn := Snapshot{ID: nextSnapshotID(img.snaps), Name: name, L1Size: uint32(len(m.l1)), Date: now,
		DiskSize: uint64(img.size), extra: newSnapshotExtra(img.size)}
	if len(m.l1) > 0 {
		if sn.L1Offset, err = img.writeL1CopyLocked(m.l1); err != nil {
			return Snapshot{}, err
		}
	}
	if err := img.applyDeltasLocked(d); err != nil {
		return Snapshot{}, err
	}
	if err := img.fixCopiedLocked(); err != nil {
		return Snapshot{}, err
	}
	snaps := append(append([]Snapshot(nil), img.snaps...), sn)
	return sn, img.writeSnapshotTableLocked(snaps)
}

// ApplySnapshot reverts the disk to the snapshot whose ID, or else name,
// is idOrName (qemu's lookup order). The snapshot stays.
func (img *Image) ApplySnapshot(idOrName string) error {
	unlock, err := img.beginSnapshotOp()
	if err != nil {
		return err
	}
	defer unlock()
	m := &img.mu
	i := findSnapshot(img.snaps, idOrName, true)
	if i < 0 {
		return fmt.Errorf("qcow2: %q: %w", idOrName, ErrNoSnapshot)
	}
	sn := img.snaps[i]
	if sn.DiskSize != 0 && int64(sn.DiskSize) != img.size {
		return unsupported(-1, "snapshot", "snapshot %q is of a %d-byte disk, the image is %d bytes", sn.Name, sn.DiskSize, img.size)
	}
	sl1, err := img.readL1Locked(sn.L1Offset, sn.L1Size)
	if err != nil {
		return err
	}
	up, down := map[int64]int64{}, map[int64]int64{}
	if err := img.reachLocked(sl1, 1, up); err != nil {
		return err
	}
	if err := img.reachLocked(m.l1, -1, down); err != nil {
		return err
	}
	oldOff, oldLen := int64(img.hdr.l1Offset), int64(len(m.l1))*8
	if oldLen > 0 {
		for c := oldOff >> img.cbits; c <= (oldOff+oldLen-1)>>img.cbits; c++ {
			down[c]--
		}
	}
	if err := img.checkDeltasLocked(up, down); err != nil {
		return err
	}
	if err := img.applyDeltasLocked(up); err != nil {
		return err
	}
	if err := img.clearCopiedLocked(sl1); err != nil {
		return err
	}
	nl1 := make([]uint64, max(len(m.l1), len(sl1)))
	copy(nl1, sl1)
	return img.switchL1Locked(nl1, down)
}

// switchL1Locked makes l1 (entries without the copied flag) the active
// L1 table in fresh clusters, then applies down, the references the old
// active L1 held.
func (img *Image) switchL1Locked(l1 []uint64, down map[int64]int64) error {
	m := &img.mu
	var off int64
	if len(l1) > 0 {
		var err error
		if off, err = img.writeL1CopyLocked(l1); err != nil {
			return err
		}
		if err := img.f.Sync(); err != nil {
			return err
		}
	}
	if err := img.switchHeaderLocked(36, uint32(len(l1)), off); err != nil {
		return err
	}
	for i := range l1 {
		l1[i] &^= entryCopied
	}
	m.l1 = l1
	img.hdr.l1Offset, img.hdr.l1Size = uint64(off), uint32(len(l1))
	m.l2set = map[int64]struct{}{}
	for _, e := range l1 {
		if o := int64(e & offsetMask); o != 0 {
			m.l2set[o>>img.cbits] = struct{}{}
		}
	}
	m.l2 = map[int64]*l2Table{}
	m.lru.Init()
	return img.applyDeltasLocked(down)
}

// DeleteSnapshot removes the first snapshot named name (by name only, as
// qemu-img does) and frees what only it referenced.
func (img *Image) DeleteSnapshot(name string) error {
	unlock, err := img.beginSnapshotOp()
	if err != nil {
		return err
	}
	defer unlock()
	i := findSnapshot(img.snaps, name, false)
	if i < 0 {
		return fmt.Errorf("qcow2: %q: %w", name, ErrNoSnapshot)
	}
	sn := img.snaps[i]
	sl1, err := img.readL1Locked(sn.L1Offset, sn.L1Size)
	if err != nil {
		return err
	}
	down := map[int64]int64{}
	if err := img.reachLocked(sl1, -1, down); err != nil {
		return err
	}
	if n := int64(sn.L1Size) * 8; n > 0 {
		for c := sn.L1Offset >> img.cbits; c <= (sn.L1Offset+n-1)>>img.cbits; c++ {
			down[c]--
		}
	}
	if err := img.checkDeltasLocked(down); err != nil {
		return err
	}
	snaps := append(append([]Snapshot(nil), img.snaps[:i]...), img.snaps[i+1:]...)
	if err := img.writeSnapshotTableLocked(snaps); err != nil {
		return err
	}
	if err := img.applyDeltasLocked(down); err != nil {
		return err
	}
	return img.fixCopiedLocked()
}

// findSnapshot returns the index of the snapshot with ID s (when byID),
// else of the first one named s, else -1.
func findSnapshot(snaps []Snapshot, s string, byID bool) int {
	if byID {
		for i, sn := range snaps {
			if sn.ID == s {
				return i
			}
		}
	}
	for i, sn := range snaps {
		if sn.Name == s {
			return i
		}
	}
	return -1
}

// readL1Locked reads a snapshot's L1 table (readSnapshots bounded it).
func (img *Image) readL1Locked(off int64, n uint32) ([]uint64, error) {
	raw := make([]byte, int64(n)*8)
	if err := hostfile.ReadFull(img.f, raw, off); err != nil {
		return nil, corrupt(off, "snapshot_l1_table", "unreadable: %v", err)
	}
	l1 := make([]uint64, n)
	for i := range l1 {
		l1[i] = binary.BigEndian.Uint64(raw[i*8:])
	}
	return l1, nil
}

// writeL1CopyLocked writes l1, copied flags cleared, into fresh clusters
// and returns where. The caller syncs before anything points there.
func (img *Image) writeL1CopyLocked(l1 []uint64) (int64, error) {
	n := int64(len(l1)) * 8
	off, err := img.allocRunLocked((n + img.cs - 1) >> img.cbits)
	if err != nil {
		return 0, err
	}
	raw := make([]byte, n)
	for i, e := range l1 {
		binary.BigEndian.PutUint64(raw[i*8:], e&^entryCopied)
	}
	return off, img.writeMeta(raw, off, 0)
}
