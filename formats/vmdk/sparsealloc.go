package vmdk

// Placing grains in a sparse extent: reserving room, new grain tables,
// publishing entries in the order a crash needs, extending the file,
// writing tables back and syncing.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"github.com/blktap-go/blktap/formats/image"
)

var errNoTable = errors.New("grain table not allocated")

// allocate reserves room for grain g and returns its file offset, or the
// grain's current state when another writer already placed it. It waits
// while another writer is allocating g, so a grain is never placed twice.
func (s *sparse) allocate(g uint64) (st grainState, off int64, reserved bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		if _, busy := s.inflight[g]; !busy {
			break
		}
		s.cond.Wait()
	}
	st, off, err = s.lookupLocked(g)
	if err != nil || st == grainData {
		return st, off, false, err
	}
	per := uint64(s.h.NumGTEsPerGT)
	t, err := s.tableLocked(uint32(g / per))
	if err != nil {
		return 0, 0, false, err
	}
	if t == nil {
		if t, err = s.newTableLocked(uint32(g / per)); err != nil {
			return 0, 0, false, err
		}
	}
	gb := s.h.grainBytes()
	if (s.next+gb)/sectorSize > math.MaxUint32 {
		return 0, 0, false, fmtErr(-1, "grain", image.ErrUnsupported, "%s: extent file would pass 2 TiB (32-bit sector offsets)", s.name)
	}
	off = s.next
	if err := s.checkGrainLocked(g, off); err != nil {
		return 0, 0, false, err
	}
	s.next += gb
	s.inflight[g] = struct{}{}
	t.pending++
	return st, off, true, nil
}

// newTableLocked places a new, empty grain table i (and its redundant
// copy) at the end of the file. The first write-back writes it whole and
// syncs it before the directory names it.
func (s *sparse) newTableLocked(i uint32) (*gtable, error) {
	if int(i) >= len(s.gd) || s.h.GDOffset == gdAtEnd {
		return nil, fmtErr(-1, "grain directory", image.ErrCorrupt, "%s: grain table %d: %v", s.name, i, errNoTable)
	}
	span := int64(s.h.gtSectors()) * sectorSize
	need := span
	if s.rgd != nil {
		need *= 2
	}
	if (s.next+need)/sectorSize > math.MaxUint32 {
		return nil, fmtErr(-1, "grain", image.ErrUnsupported, "%s: extent file would pass 2 TiB (32-bit sector offsets)", s.name)
	}
	if s.rgd != nil {
		s.rgd[i] = uint32(s.next / sectorSize)
		s.addMetaLocked(s.next)
		s.next += span
	}
	s.gd[i] = uint32(s.next / sectorSize)
	s.addMetaLocked(s.next)
	s.next += span
	s.size = max(s.size, s.next)
	t := &gtable{idx: i, e: make([]uint32, s.h.NumGTEsPerGT), dirty: true}
	s.evictLocked()
	t.el = s.lru.PushFront(t)
	s.cache[i] = t
	return t, nil
}

// publish records that grain g's data is written at off, or (st
// grainUnalloc / grainZero) that it holds no data, and writes the entry
// to the file before returning: a write is acknowledged only once a
// process that dies right after it (leaving only the page cache) loses
// nothing. The caller has made the grain's space durable (extend) and,
// where a lost data write would not read as the grain's old content,
// synced the data.
func (s *sparse) publish(g uint64, st grainState, off int64, wasReserved bool) error {
	per := uint64(s.h.NumGTEsPerGT)
	if wasReserved {
		// The reservation holds off other writers of g until the entry is
		// in the file: one that wrote in place into the new grain and was
		// acknowledged before then would be lost with the entry.
		defer s.release(g)
	}
	s.mu.Lock()
	if !wasReserved {
		for {
			if _, busy := s.inflight[g]; !busy {
				break
			}
			s.cond.Wait()
		}
	}
	t, err := s.tableLocked(uint32(g / per))
	if err != nil || t == nil {
		s.mu.Unlock()
		if err == nil && st != grainUnalloc {
			err = fmtErr(-1, "grain directory", image.ErrUnsupported, "%s: grain %d: %v", s.name, g, errNoTable)
		}
		return err
	}
	var v uint32
	switch st {
	case grainZero:
		v = 1
	case grainData:
		v = uint32(off / sectorSize)
		if end := off + s.h.grainBytes(); end > s.size {
			s.size = end
		}
	}
	if t.e[g%per] == v {
		s.mu.Unlock()
		return nil
	}
	t.e[g%per] = v
	// Pinned until written: an evicted copy reloaded from the file before
	// the write would show the old entry.
	t.pending++
	s.mu.Unlock()
	err = s.writeBack(t, int(g%per))
	s.mu.Lock()
	t.pending--
	s.mu.Unlock()
	return err
}

// extendBatch is how far past a new grain the file is extended at once:
// one fdatasync per batch for sequential writes, at most a batch leaked
// by a crash (Close gives back what is unused).
const extendBatch = 4 << 20

// extend makes the file at least end bytes long, durably, before any
// write at or past the old durable end. Every write lands below the
// durable end (callers extend first), so growing the file here never cuts
// off anything.
func (s *sparse) extend(end int64) error {
	s.extMu.Lock()
	defer s.extMu.Unlock()
	if end <= s.durable {
		return nil
	}
	target := min(end+extendBatch, math.MaxUint32*sectorSize)
	size, err := s.f.Size()
	if err == nil && size < target {
		err = s.f.Truncate(target)
	}
	if err == nil {
		err = s.gsync.Sync(s.f.Sync)
	}
	if err != nil {
		return fmt.Errorf("vmdk: %s: extend to %d bytes: %w", s.name, target, err)
	}
	s.durable = target
	return nil
}

// trim gives back the space extend reserved and no grain used. Only at
// Close, with no writer left.
func (s *sparse) trim() error {
	s.mu.Lock()
	next := s.next
	s.mu.Unlock()
	size, err := s.f.Size()
	if err != nil || size <= next {
		return err
	}
	if err := s.f.Truncate(next); err != nil {
		return fmt.Errorf("vmdk: %s: %w", s.name, err)
	}
	return s.f.Sync()
}

// release ends the reservation of grain g.
func (s *sparse) release(g uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.inflight, g)
	if t := s.cache[uint32(g/uint64(s.h.NumGTEsPerGT))]; t != nil {
		t.pending--
	}
	s.cond.Broadcast()
}

// abort releases a reservation whose data write failed. The space leaks,
// which the format tolerates (check reports it).
func (s *sparse) abort(g uint64) { s.release(g) }

// writeBack writes entry j of table t (primary and redundant copies) to
// the file, or the whole table when t is dirty. A table the directory
// does not name yet is synced before its directory entries are written,
// so a power cut never leaves the directory naming a table of garbage.
func (s *sparse) writeBack(t *gtable, j int) error {
	s.metaMu.Lock()
	defer s.metaMu.Unlock()
	s.mu.Lock()
	whole, named := t.dirty, t.onDisk
	var buf []byte
	at := int64(4 * j)
	if whole {
		buf = make([]byte, s.gtBytes)
		for k, v := range t.e {
			binary.LittleEndian.PutUint32(buf[4*k:], v)
		}
		at = 0
		t.dirty = false
	} else {
		buf = binary.LittleEndian.AppendUint32(nil, t.e[j])
	}
	var places []int64
	for _, dir := range [][]uint32{s.gd, s.rgd} {
		if int(t.idx) < len(dir) && dir[t.idx] != 0 {
			places = append(places, int64(dir[t.idx])*sectorSize+at)
		}
	}
	gd := s.gd[t.idx]
	var rgd uint32
	if s.rgd != nil {
		rgd = s.rgd[t.idx]
	}
	s.mu.Unlock()
	fail := func(err error) error {
		s.mu.Lock()
		t.dirty = true
		s.mu.Unlock()
		return err
	}
	for _, p := range places {
		if _, err := s.f.WriteAt(buf, p); err != nil {
			return fail(fmt.Errorf("vmdk: %s: write grain table %d: %w", s.name, t.idx, err))
		}
	}
	if named {
		return nil
	}
	if err := s.gsync.Sync(s.f.Sync); err != nil {
		return fail(fmt.Errorf("vmdk: %s: sync grain table %d: %w", s.name, t.idx, err))
	}
	err := s.putDirEntry(s.h.GDOffset, t.idx, gd)
	if err == nil && s.rgd != nil {
		err = s.putDirEntry(s.h.RGDOffset, t.idx, rgd)
	}
	if err != nil {
		return fail(err)
	}
	s.mu.Lock()
	t.onDisk = true
	s.mu.Unlock()
	return nil
}

// flush makes the extent durable. Every entry is already in the file
// (publish wrote it), so this is one fdatasync, after retrying the
// write-back of any table whose earlier write-back failed.
func (s *sparse) flush() error {
	s.mu.Lock()
	var redo []*gtable
	for _, t := range s.cache {
		// A table with allocations in flight is theirs to write: its space
		// may not be durable yet.
		if (t.dirty || !t.onDisk) && t.pending == 0 {
			redo = append(redo, t)
		}
	}
	s.mu.Unlock()
	for _, t := range redo {
		if err := s.writeBack(t, 0); err != nil {
			return err
		}
	}
	if err := s.gsync.Sync(s.f.Sync); err != nil {
		return fmt.Errorf("vmdk: %s: %w", s.name, err)
	}
	return nil
}

// putDirEntry writes entry i of the directory at sector dir.
func (s *sparse) putDirEntry(dir uint64, i, v uint32) error {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	if _, err := s.f.WriteAt(b[:], int64(dir)*sectorSize+4*int64(i)); err != nil {
		return fmt.Errorf("vmdk: %s: write grain directory entry %d: %w", s.name, i, err)
	}
	return nil
}
