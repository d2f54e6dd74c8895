package qcow2

// Changing the virtual size (`image resize`). Growing may need a bigger
// L1 table: it is written whole in new clusters, then the header is
// switched to it in one write, then the old table is freed, so a crash
// leaves the old table or the new one, never half of each. Shrinking
// commits the new size first and only then drops what lies beyond it: a
// crash in between leaves entries past the end, invisible to the guest
// and cleared by the next grow.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"github.com/blktap-go/blktap/formats/image"
)

// ErrResizeSnapshots: qemu refuses to resize a version 2 image with
// internal snapshots (their table records no size of their own).
var ErrResizeSnapshots = errors.New("can't resize a v2 image which has snapshots")

// Resize sets the virtual size to size bytes, a positive multiple of 512.
// Growing shows zeros past the old end, even over a longer backing file;
// shrinking discards every cluster past the new end. The caller decides
// whether a shrink is wanted. Resize must not run concurrently with other
// calls on img: the size the I/O paths check changes under them.
func (img *Image) Resize(size int64) error {
	if img.ro {
		return image.ErrReadOnly
	}
	if size <= 0 || size%512 != 0 {
		return fmt.Errorf("qcow2: the new size must be a positive multiple of 512 (not %d)", size)
	}
	if size > maxFileSize {
		return unsupported(24, "size", "virtual size %d is larger than 2^56", size)
	}
	img.io.Lock()
	defer img.io.Unlock()
	img.mu.Lock()
	closed, broken := img.mu.closed, img.mu.broken
	img.mu.Unlock()
	switch {
	case closed:
		return image.ErrClosed
	case broken != nil:
		return broken
	case len(img.snaps) > 0 && img.hdr.version < 3:
		return fmt.Errorf("qcow2: %s: %w", img.path, ErrResizeSnapshots)
	case size > img.size:
		return img.grow(size)
	case size < img.size:
		return img.shrink(size)
	}
	return nil
}

// grow: a bigger L1 table if needed, zeros over [old, size), then the
// size in the header.
func (img *Image) grow(size int64) error {
	img.mu.Lock()
	var err error
	if need := int64(l1EntriesFor(uint64(size), img.cbits)); need > int64(len(img.mu.l1)) {
		err = img.growL1Locked(need)
	}
	img.mu.Unlock()
	if err != nil {
		return err
	}
	if err := img.clearBeyond(img.size, size); err != nil {
		return err
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := img.applyFreesLocked(); err != nil {
		return err
	}
	// The zeros are durable before the size that shows them.
	if err := img.f.Sync(); err != nil {
		return err
	}
	return img.setSizeLocked(size)
}

// clearBeyond makes [from, to), which lies past the virtual size, read as
// zeros once the size covers it: the tail of a partial cluster may hold
// old data (qemu's shrink leaves it), whole clusters may hold entries a
// crashed shrink left, and a longer backing file would show through.
func (img *Image) clearBeyond(from, to int64) error {
	if in := from & (img.cs - 1); in != 0 {
		n := min(img.cs-in, to-from)
		if err := img.zeroPart(from>>img.cbits, in, n); err != nil {
			return err
		}
		from += n
	}
	for vc := from >> img.cbits; vc<<img.cbits < to; {
		l1i := vc >> img.l2bits
		img.mu.Lock()
		l1e := img.mu.l1[l1i]
		img.mu.Unlock()
		backed := img.backing != nil && vc<<img.cbits < img.bsize
		if l1e&offsetMask == 0 && !backed {
			vc = (l1i + 1) << img.l2bits // no L2 table: the whole range is unallocated
			continue
		}
		if err := img.discardCluster(vc); err != nil {
			return err
		}
		vc++
	}
	return nil
}

// growL1Locked moves the active L1 table to new clusters at the end of the
// file with n entries.
func (img *Image) growL1Locked(n int64) error {
	m := &img.mu
	if n*8 > maxL1Bytes {
		return unsupported(36, "l1_size", "%d L1 entries is more than the %d-byte cap", n, maxL1Bytes)
	}
	clusters := (n*8 + img.cs - 1) / img.cs
	start := m.end
	// Taken first: a refcount block the refcounts below need must not
	// land inside the new table.
	for c := start; c < start+clusters; c++ {
		m.taken[c] = true
	}
	m.end = start + clusters
	for c := start; c < start+clusters; c++ {
		if err := img.setRefcountLocked(c, 1); err != nil {
			return err
		}
	}
	if err := img.writeRefblocksLocked(); err != nil {
		return err
	}
	nl1 := make([]uint64, n)
	copy(nl1, m.l1)
	raw := make([]byte, clusters*img.cs)
	for i, e := range nl1 {
		binary.BigEndian.PutUint64(raw[i*8:], e)
	}
	off := start << img.cbits
	if err := img.writeMeta(raw, off, 0); err != nil {
		return err
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	// l1_size and l1_table_offset are adjacent: one write switches both.
	var hb [12]byte
	binary.BigEndian.PutUint32(hb[:], uint32(n))
	binary.BigEndian.PutUint64(hb[4:], uint64(off))
	if err := img.writeMeta(hb[:], 36, mHeader); err != nil {
		return err
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	oldOff, oldN := int64(img.hdr.l1Offset), int64(len(m.l1))
	img.hdr.l1Offset, img.hdr.l1Size = uint64(off), uint32(n)
	m.l1 = nl1
	if oldN > 0 {
		for c := oldOff >> img.cbits; c <= (oldOff+oldN*8-1)>>img.cbits; c++ {
			if err := img.decrefLocked(c); err != nil {
				return err
			}
		}
	}
	return img.writeRefblocksLocked()
}

// shrink commits the new size, then unlinks every cluster past it.
func (img *Image) shrink(size int64) error {
	img.mu.Lock()
	err := img.setSizeLocked(size)
	img.mu.Unlock()
	if err != nil {
		return err
	}
	// The rest of the last cluster reads as zeros if the image grows
	// again (qemu leaves the old bytes there).
	if in := size & (img.cs - 1); in != 0 {
		if err := img.zeroPart(size>>img.cbits, in, img.cs-in); err != nil {
			return err
		}
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	first := (size + img.cs - 1) >> img.cbits
	if err := img.unlinkFromLocked(first); err != nil {
		return err
	}
	if err := img.applyFreesLocked(); err != nil {
		return err
	}
	// What was freed at the end of the file may be cut off at Close,
	// as qemu-img resize --shrink truncates the file.
	img.openSize = 0
	return img.f.Sync()
}

// unlinkFromLocked drops guest clusters from vc first on: L2 tables wholly
// past it go with their L1 entry, the rest entry by entry.
func (img *Image) unlinkFromLocked(first int64) error {
	m := &img.mu
	whole := (first + 1<<img.l2bits - 1) >> img.l2bits
	for vc := first; vc < whole<<img.l2bits && vc>>img.l2bits < int64(len(m.l1)); vc++ {
		e, err := img.entryLocked(vc)
		if err != nil {
			return err
		}
		if e != 0 {
			if err := img.linkLocked(vc, 0, e); err != nil {
				return err
			}
		}
	}
	for l1i := whole; l1i < int64(len(m.l1)); l1i++ {
		if err := img.dropL2Locked(l1i); err != nil {
			return err
		}
	}
	return nil
}

// dropL2Locked clears L1 entry l1i and queues the release of its L2 table
// and, when the table is ours alone (copied flag), of what it references.
func (img *Image) dropL2Locked(l1i int64) error {
	m := &img.mu
	l1e := m.l1[l1i]
	off := int64(l1e & offsetMask)
	if off == 0 {
		return nil
	}
	var refs []uint64
	if l1e&entryCopied != 0 {
		t, err := img.l2Locked(off)
		if err != nil {
			return err
		}
		refs = append(refs, t.e...)
	}
	var z [8]byte
	if err := img.writeMeta(z[:], int64(img.hdr.l1Offset)+l1i*8, mL1); err != nil {
		return err
	}
	m.l1[l1i] = 0
	if t, ok := m.l2[off]; ok {
		m.lru.Remove(t.elem)
		delete(m.l2, off)
	}
	delete(m.l2set, off>>img.cbits)
	for _, e := range refs {
		img.dropLocked(e)
	}
	m.pendingFree = append(m.pendingFree, off>>img.cbits)
	return nil
}

// setSizeLocked writes the virtual size into the header, durably.
func (img *Image) setSizeLocked(size int64) error {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(size))
	if err := img.writeMeta(b[:], 24, mHeader); err != nil {
		return err
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	img.hdr.size = uint64(size)
	img.size = size
	return nil
}

// LockFile takes on f the locks qemu's protocol gives a writer that also
// resizes, refusing (ErrLocked) when another process holds the file: for
// tools that change a file of a format with no locks of its own (raw).
func LockFile(f *os.File) error { return lockImage(f, true) }
