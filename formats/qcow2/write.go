package qcow2

import (
	"encoding/binary"
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// ---- the cluster pool ------------------------------------------------------

// takePoolLocked hands out a cluster whose refcount is already 1 and
// durable, so L2 or L1 entries may point at it without a sync of their own.
func (img *Image) takePoolLocked() (poolCluster, error) {
	m := &img.mu
	if len(m.pool) == 0 {
		if err := img.ensureDirtyLocked(); err != nil {
			return poolCluster{}, err
		}
		for len(m.pool) < img.poolSize {
			c, fresh, err := img.takeFreeLocked()
			if err != nil {
				return poolCluster{}, err
			}
			if err := img.setRefcountLocked(c, 1); err != nil {
				return poolCluster{}, err
			}
			m.pool = append(m.pool, poolCluster{idx: c, fresh: fresh})
		}
		if err := img.writeRefblocksLocked(); err != nil {
			return poolCluster{}, err
		}
		// The file must cover every cluster an entry may name, or a crash
		// could leave an entry pointing past its end (a corruption to
		// qemu-img check). The extension reads as zeros and is made
		// durable by the sync below.
		last := (m.pool[len(m.pool)-1].idx + 1) << img.cbits
		if last > img.fileEnd.Load() {
			if err := img.f.Truncate(last); err != nil {
				return poolCluster{}, fmt.Errorf("qcow2: %w", err)
			}
			img.grew(last)
		}
		// With lazy refcounts the dirty bit stands in for this ordering.
		if !img.lazy() && !img.scratch {
			if err := img.f.Sync(); err != nil {
				return poolCluster{}, err
			}
		}
	}
	pc := m.pool[0]
	m.pool = m.pool[1:]
	return pc, nil
}

// releasePoolLocked returns reserved clusters nobody used.
func (img *Image) releasePoolLocked() error {
	for _, pc := range img.mu.pool {
		if err := img.setRefcountLocked(pc.idx, 0); err != nil {
			return err
		}
	}
	img.mu.pool = nil
	return nil
}

// trimLocked cuts free clusters off the end of the file (the unused part
// of the last reservation).
func (img *Image) trimLocked() error {
	fe := img.fileEnd.Load()
	c := (fe+img.cs-1)>>img.cbits - 1
	for ; c > 0; c-- {
		rc, err := img.refcountLocked(c)
		if err != nil {
			return err
		}
		if rc != 0 {
			break
		}
	}
	// Never below the length at open: trailing space someone else left
	// is not ours to cut.
	if n := max((c+1)<<img.cbits, img.openSize); n < fe {
		if err := img.f.Truncate(n); err != nil {
			return fmt.Errorf("qcow2: %w", err)
		}
		img.fileEnd.Store(n)
		img.mu.end = min(img.mu.end, (n+img.cs-1)>>img.cbits)
		img.mu.freeHint = min(img.mu.freeHint, img.mu.end)
	}
	return nil
}

func (img *Image) lazy() bool { return img.hdr.compatible&compatLazyRefcounts != 0 }

// ensureDirtyLocked sets the dirty bit (durably) before the first
// allocation of an image with lazy refcounts.
func (img *Image) ensureDirtyLocked() error {
	if img.lazy() && !img.mu.dirtySet && img.hdr.version == 3 {
		return img.setDirtyLocked(true)
	}
	return nil
}

func (img *Image) setDirtyLocked(on bool) error {
	if on {
		img.hdr.incompatible |= incDirty
	} else {
		img.hdr.incompatible &^= incDirty
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], img.hdr.incompatible)
	if err := img.writeMeta(b[:], 72, mHeader); err != nil {
		return err
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	img.mu.dirtySet = on
	return nil
}

// ---- writes ----------------------------------------------------------------

// WriteAt writes len(p) bytes at guest offset off.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if img.ro {
		return 0, image.ErrReadOnly
	}
	if err := image.CheckRange(off, len(p), img.size); err != nil {
		return 0, err
	}
	img.io.RLock()
	defer img.io.RUnlock()
	done := 0
	for done < len(p) {
		v := off + int64(done)
		in := v & (img.cs - 1)
		n := int(min(int64(len(p)-done), img.cs-in))
		if err := img.writeCluster(v>>img.cbits, in, p[done:done+n]); err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// writeCluster writes p at byte in of guest cluster vc. The caller holds
// img.io (shared or exclusive).
func (img *Image) writeCluster(vc, in int64, p []byte) error {
	return img.writeClusterZ(vc, in, p, nil)
}

// writeClusterZ is writeCluster; z, when not nil, is p (a whole cluster)
// deflated, stored compressed if the cluster needs a new host cluster.
func (img *Image) writeClusterZ(vc, in int64, p, z []byte) error {
	m := &img.mu
	for {
		m.Lock()
		if m.closed {
			m.Unlock()
			return image.ErrClosed
		}
		if m.broken != nil {
			m.Unlock()
			return m.broken
		}
		e, err := img.entryLocked(vc)
		var k kind
		var host int64
		if err == nil {
			k, host, err = img.classify(e, vc)
		}
		if err != nil && e&entryCompressed == 0 && e&offsetMask != 0 {
			// An entry naming metadata: writing through it would destroy
			// the metadata, so the image is marked as well as refused.
			if hit := img.overlapLocked(int64(e&offsetMask), img.cs, 0); hit != 0 {
				err = img.markCorruptLocked(int64(e&offsetMask), "l2_entry",
					"preventing invalid write on metadata: guest cluster %d maps to host cluster %d, which holds the %v", vc, e&offsetMask>>img.cbits, hit)
			}
		}
		if err != nil {
			m.Unlock()
			return err
		}
		if k == kNormal && e&entryCopied != 0 {
			m.Unlock()
			return img.writeData(p, host+in)
		}
		if ch := m.inflight[vc]; ch != nil {
			// Another writer is allocating this cluster: wait, then write
			// into what it allocated.
			m.Unlock()
			<-ch
			continue
		}
		ch := make(chan struct{})
		m.inflight[vc] = ch
		var pc poolCluster
		var zoff int64
		if z != nil {
			zoff, err = img.reserveCompressedLocked(int64(len(z)))
			if err == nil {
				err = img.refuseOverlapLocked(zoff, int64(len(z)), 0, "data_write")
			}
		} else {
			pc, err = img.takePoolLocked()
			if err == nil {
				// The pool was checked when it was filled; metadata placed
				// since then (from the pool too) must not share a cluster.
				err = img.refuseOverlapLocked(pc.idx<<img.cbits, img.cs, 0, "data_write")
			}
		}
		m.Unlock()
		if err == nil {
			if z != nil {
				err = img.allocWriteCompressed(vc, z, e, zoff)
			} else {
				err = img.allocWrite(vc, in, p, e, k, host, pc)
			}
		}
		m.Lock()
		delete(m.inflight, vc)
		close(ch)
		if werr := img.writeRefblocksLocked(); err == nil {
			err = werr
		}
		m.Unlock()
		return err
	}
}

func (img *Image) writeData(p []byte, off int64) error {
	if _, err := img.f.WriteAt(p, off); err != nil {
		return fmt.Errorf("qcow2: write data at %#x: %w", off, err)
	}
	img.grew(off + int64(len(p)))
	return nil
}

// allocWrite fills the new cluster pc with the old content of guest
// cluster vc merged with p, then links it. When the old content is not
// zeros (backing file, shared or compressed cluster) or pc may hold stale
// bytes, the data is synced before the L2 entry names it, so a crash never
// leaves an entry pointing at a cluster whose content was not written.
func (img *Image) allocWrite(vc, in int64, p []byte, e uint64, k kind, host int64, pc poolCluster) error {
	newOff := pc.idx << img.cbits
	oldZero := k == kZero || (k == kUnalloc && (img.backing == nil || vc<<img.cbits >= img.bsize))
	full := in == 0 && int64(len(p)) == img.cs
	var err error
	switch {
	case full:
		err = img.writeData(p, newOff)
	case oldZero && pc.fresh:
		err = img.writeData(p, newOff+in)
	default:
		buf := make([]byte, img.cs)
		switch k {
		case kNormal:
			err = hostfile.ReadZeroed(img.f, buf, host)
		case kCompressed:
			err = img.readCompressed(e, buf)
		case kUnalloc:
			err = img.readBacking(buf, vc<<img.cbits)
		}
		if err == nil {
			copy(buf[in:], p)
			err = img.writeData(buf, newOff)
		}
	}
	if err == nil && !(oldZero && pc.fresh) && !img.scratch {
		err = img.gsync.Sync(img.f.Sync)
	}
	m := &img.mu
	m.Lock()
	defer m.Unlock()
	if err != nil {
		pc.fresh = false
		m.pool = append(m.pool, pc)
		return err
	}
	return img.linkLocked(vc, uint64(newOff)|entryCopied, e)
}

// linkLocked stores entry ne for guest cluster vc (whose entry was old)
// and queues the drop of the references old held: it happens at the next
// Flush, Discard or Close (applyFreesLocked).
func (img *Image) linkLocked(vc int64, ne, old uint64) error {
	t, err := img.writableL2Locked(vc)
	if err != nil {
		return err
	}
	i := vc & (1<<img.l2bits - 1)
	if t.e[i] != old {
		return corrupt(t.off+i*8, "l2_entry", "guest cluster %d changed under an allocation", vc)
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], ne)
	if err := img.writeMeta(b[:], t.off+i*8, mL2); err != nil {
		return err
	}
	t.e[i] = ne
	img.dropLocked(old)
	return nil
}

// dropLocked queues the release of the host clusters an old entry
// referenced; applyFreesLocked performs it.
func (img *Image) dropLocked(e uint64) {
	if e&entryCompressed != 0 {
		off, n := img.compressedSpan(e)
		for c := off >> img.cbits; c <= (off+n-1)>>img.cbits; c++ {
			img.mu.pendingFree = append(img.mu.pendingFree, c)
		}
	} else if off := int64(e & offsetMask); off != 0 {
		img.mu.pendingFree = append(img.mu.pendingFree, off>>img.cbits)
	}
}

// applyFreesLocked performs the queued refcount drops. The caller holds
// img.io exclusively, so no request in flight still addresses a freed
// cluster. The entries that stopped naming the clusters are synced first:
// a lowered refcount must never be durable while a durable entry still
// counts on it. Clusters whose count reaches zero are punched out.
func (img *Image) applyFreesLocked() error {
	m := &img.mu
	if m.broken != nil {
		// The refcounts are not to be trusted: a cluster kept is a leak,
		// a cluster freed by mistake could be handed out again.
		m.pendingFree = nil
		return nil
	}
	if len(m.pendingFree) > 0 {
		if !img.scratch && !(img.lazy() && m.dirtySet) {
			if err := img.f.Sync(); err != nil {
				return err
			}
		}
		for _, c := range m.pendingFree {
			if err := img.decrefLocked(c); err != nil {
				return err
			}
			if rc, _ := img.refcountLocked(c); rc == 0 {
				// Failure only costs space (e.g. on file systems
				// without hole support).
				_ = img.f.PunchHole(c<<img.cbits, img.cs)
				if c == m.zc {
					// Free again: no more packing into it.
					m.zc, m.zused = 0, 0
				}
			}
		}
		m.pendingFree = nil
	}
	return img.writeRefblocksLocked()
}

// writableL2Locked returns the L2 table of guest cluster vc, allocating
// it, or copying it when it is shared with a snapshot (L1 entry without
// the copied flag). The new table is written (and synced when it holds
// entries or may be stale on disk) before the L1 entry points to it.
func (img *Image) writableL2Locked(vc int64) (*l2Table, error) {
	m := &img.mu
	l1i := vc >> img.l2bits
	l1e := m.l1[l1i]
	old := int64(l1e & offsetMask)
	if old != 0 && l1e&entryCopied != 0 {
		return img.l2Locked(old)
	}
	pc, err := img.takePoolLocked()
	if err != nil {
		return nil, err
	}
	t := &l2Table{off: pc.idx << img.cbits, e: make([]uint64, img.cs/8)}
	if old != 0 {
		ot, err := img.l2Locked(old)
		if err != nil {
			m.pool = append(m.pool, pc)
			return nil, err
		}
		copy(t.e, ot.e)
	}
	raw := make([]byte, img.cs)
	for i, e := range t.e {
		binary.BigEndian.PutUint64(raw[i*8:], e)
	}
	// Not yet in l2set: checked against every structure, other L2
	// tables included.
	if err := img.writeMeta(raw, t.off, 0); err != nil {
		return nil, err
	}
	if (old != 0 || !pc.fresh) && !img.scratch {
		if err := img.f.Sync(); err != nil {
			return nil, err
		}
	}
	ne := uint64(t.off) | entryCopied
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], ne)
	if err := img.writeMeta(b[:], int64(img.hdr.l1Offset)+l1i*8, mL1); err != nil {
		return nil, err
	}
	m.l1[l1i] = ne
	m.l2set[pc.idx] = struct{}{}
	img.cacheL2Locked(t)
	if old != 0 {
		if ot, ok := m.l2[old]; ok {
			m.lru.Remove(ot.elem)
			delete(m.l2, old)
		}
		delete(m.l2set, old>>img.cbits)
		// The snapshot keeps the old table: queue the drop of our
		// reference until the new L1 entry is durable.
		m.pendingFree = append(m.pendingFree, old>>img.cbits)
	}
	return t, nil
}

// ---- discard ---------------------------------------------------------------

// Discard deallocates [off, off+length): whole clusters lose their host
// cluster and become unallocated, or zero clusters where a backing file
// would otherwise show through (version 2 has no zero clusters: there
// they are zero-filled instead). Partial clusters at the edges are
// zero-filled. Freed clusters are punched out of the file.
func (img *Image) Discard(off, length int64) error {
	if img.ro {
		return image.ErrReadOnly
	}
	if err := image.CheckRange64(off, length, img.size); err != nil {
		return fmt.Errorf("qcow2: discard: %w", err)
	}
	img.io.Lock()
	defer img.io.Unlock()
	img.mu.Lock()
	closed, broken := img.mu.closed, img.mu.broken
	img.mu.Unlock()
	if closed {
		return image.ErrClosed
	}
	if broken != nil {
		return broken
	}
	end := off + length
	for off < end {
		vc := off >> img.cbits
		in := off & (img.cs - 1)
		n := min(end-off, img.cs-in)
		if whole := in == 0 && (n == img.cs || off+n == img.size); !whole {
			if err := img.zeroPart(vc, in, n); err != nil {
				return err
			}
		} else if err := img.discardCluster(vc); err != nil {
			return err
		}
		off += n
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.applyFreesLocked()
}

// zeroPart zero-fills part of a cluster if it may read as non-zero.
func (img *Image) zeroPart(vc, in, n int64) error {
	img.mu.Lock()
	e, err := img.entryLocked(vc)
	var k kind
	if err == nil {
		k, _, err = img.classify(e, vc)
	}
	img.mu.Unlock()
	if err != nil {
		return err
	}
	if k == kZero || (k == kUnalloc && (img.backing == nil || vc<<img.cbits >= img.bsize)) {
		return nil
	}
	return img.writeCluster(vc, in, make([]byte, n))
}

func (img *Image) discardCluster(vc int64) error {
	m := &img.mu
	m.Lock()
	defer m.Unlock()
	if m.closed {
		return image.ErrClosed
	}
	e, err := img.entryLocked(vc)
	if err != nil {
		return err
	}
	k, _, err := img.classify(e, vc)
	if err != nil {
		return err
	}
	backed := img.backing != nil && vc<<img.cbits < img.bsize
	switch {
	case k == kZero && e&offsetMask == 0:
		return nil
	case k == kUnalloc && !backed:
		return nil
	case !backed:
		return img.linkLocked(vc, 0, e)
	case img.hdr.version >= 3:
		return img.linkLocked(vc, entryZero, e)
	}
	// Version 2 over a backing file: zeros must be written.
	m.Unlock()
	err = img.writeCluster(vc, 0, make([]byte, img.cs))
	m.Lock()
	return err
}
