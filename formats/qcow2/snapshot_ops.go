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
// Each operation reads and checks every table it touches, works out the
// new active L1 (copying each L2 table whose copied flags must change),
// the new snapshot table and every refcount change, and hands that to
// commitLocked (snapshot_commit.go): all of it written in fresh clusters,
// synced, then switched to by one header write. A crash leaves the image
// as it was or as the operation leaves it, with no leak and no copied
// flag out of step with a refcount.

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
// The snapshot takes over the active L1 table as it stands; the active
// layer gets a new one.
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
	// The snapshot keeps the active L1 the header stops naming.
	img.addSpan(d, int64(img.hdr.l1Offset), int64(len(m.l1))*8, 1)
	now = now.UTC().Truncate(time.Microsecond) // what qemu stores
	sn := Snapshot{ID: nextSnapshotID(img.snaps), Name: name, Date: now,
		L1Offset: int64(img.hdr.l1Offset), L1Size: uint32(len(m.l1)),
		DiskSize: uint64(img.size), extra: newSnapshotExtra(img.size)}
	t, err := img.planActiveLocked(m.l1, d)
	if err != nil {
		return Snapshot{}, err
	}
	t.snaps = append(append([]Snapshot(nil), img.snaps...), sn)
	return sn, img.commitLocked(t)
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
	i, sl1, d, err := img.snapshotReachLocked(idOrName, true, 1)
	if err != nil {
		return err
	}
	if sn := img.snaps[i]; sn.DiskSize != 0 && int64(sn.DiskSize) != img.size {
		return unsupported(-1, "snapshot", "snapshot %q is of a %d-byte disk, the image is %d bytes", sn.Name, sn.DiskSize, img.size)
	}
	if err := img.reachLocked(m.l1, -1, d); err != nil {
		return err
	}
	src := make([]uint64, max(len(m.l1), len(sl1)))
	copy(src, sl1)
	t, err := img.planActiveLocked(src, d)
	if err != nil {
		return err
	}
	t.snaps = img.snaps
	return img.commitLocked(t)
}

// DeleteSnapshot removes the first snapshot named name (by name only, as
// qemu-img does) and frees what only it referenced.
func (img *Image) DeleteSnapshot(name string) error {
	unlock, err := img.beginSnapshotOp()
	if err != nil {
		return err
	}
	defer unlock()
	m := &img.mu
	i, _, d, err := img.snapshotReachLocked(name, false, -1)
	if err != nil {
		return err
	}
	sn := img.snaps[i]
	img.addSpan(d, sn.L1Offset, int64(sn.L1Size)*8, -1)
	t, err := img.planActiveLocked(m.l1, d)
	if err != nil {
		return err
	}
	t.snaps = append(append([]Snapshot(nil), img.snaps[:i]...), img.snaps[i+1:]...)
	return img.commitLocked(t)
}

// snapshotReachLocked finds a snapshot (findSnapshot), reads its L1
// table and counts the references it makes with sign (reachLocked).
func (img *Image) snapshotReachLocked(key string, byID bool, sign int64) (int, []uint64, map[int64]int64, error) {
	i := findSnapshot(img.snaps, key, byID)
	if i < 0 {
		return 0, nil, nil, fmt.Errorf("qcow2: %q: %w", key, ErrNoSnapshot)
	}
	sn := img.snaps[i]
	l1, err := img.readL1Locked(sn.L1Offset, sn.L1Size)
	if err != nil {
		return 0, nil, nil, err
	}
	d := map[int64]int64{}
	if err := img.reachLocked(l1, sign, d); err != nil {
		return 0, nil, nil, err
	}
	return i, l1, d, nil
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
