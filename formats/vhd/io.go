package vhd

import (
	"encoding/binary"
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// bitTest reports whether sector s of a block is marked in bitmap bm.
func (img *Image) bitTest(bm []byte, s int64) bool {
	if img.oldBits {
		return (binary.LittleEndian.Uint32(bm[(s>>5)*4:])>>(s&31))&1 != 0
	}
	return bm[s>>3]&(0x80>>(s&7)) != 0
}

func (img *Image) bitSet(bm []byte, s int64) {
	if img.oldBits {
		w := binary.LittleEndian.Uint32(bm[(s>>5)*4:]) | 1<<(s&31)
		binary.LittleEndian.PutUint32(bm[(s>>5)*4:], w)
		return
	}
	bm[s>>3] |= 0x80 >> (s & 7)
}

func (img *Image) bitClear(bm []byte, s int64) {
	if img.oldBits {
		w := binary.LittleEndian.Uint32(bm[(s>>5)*4:]) &^ (1 << (s & 31))
		binary.LittleEndian.PutUint32(bm[(s>>5)*4:], w)
		return
	}
	bm[s>>3] &^= 0x80 >> (s & 7)
}

// lookup returns block blk's BAT entry and, if allocated, its bitmap.
func (img *Image) lookup(blk int64) (uint32, []byte, error) {
	img.mu.RLock()
	e := img.bat[blk]
	bm := img.bmCache[uint32(blk)]
	img.mu.RUnlock()
	if e == batUnused || bm != nil {
		return e, bm, nil
	}
	bm = make([]byte, img.bmSize)
	if err := hostfile.ReadFull(img.f, bm, int64(e)*sectorSize); err != nil {
		return 0, nil, fmt.Errorf("vhd: read bitmap of block %d: %w", blk, err)
	}
	img.mu.Lock()
	// A writer may have installed a newer bitmap meanwhile; keep it.
	if cur, ok := img.bmCache[uint32(blk)]; ok {
		bm = cur
	} else if img.bat[blk] == e {
		img.cacheLocked(uint32(blk), bm)
	}
	img.mu.Unlock()
	return e, bm, nil
}

// cacheLocked installs a bitmap, evicting an arbitrary one when full.
func (img *Image) cacheLocked(blk uint32, bm []byte) {
	if _, ok := img.bmCache[blk]; !ok && len(img.bmCache) >= img.cacheCap {
		for k := range img.bmCache {
			delete(img.bmCache, k)
			break
		}
	}
	img.bmCache[blk] = bm
}

func (img *Image) dataOff(e uint32) int64 { return int64(e)*sectorSize + img.bmSize }

// readParent fills p from the parent at off, with zeros where there is
// no parent or past its end.
func (img *Image) readParent(p []byte, off int64) error {
	if img.noParent {
		return fmt.Errorf("vhd: %s: read at %d needs the parent, which was not opened (SkipParent): %w", img.path, off, image.ErrUnsupported)
	}
	if err := image.ReadBacking(img.parent, p, off); err != nil {
		return fmt.Errorf("vhd: read parent at %d: %w", off, err)
	}
	return nil
}

// ReadAt reads from the disk; unallocated sectors come from the parent
// (zeros past its end) or read as zeros.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if err := img.enter(); err != nil {
		return 0, err
	}
	defer img.leave()
	if err := image.CheckRange(off, len(p), img.size); err != nil {
		return 0, err
	}
	if img.hdr == nil {
		if err := hostfile.ReadFull(img.f, p, off); err != nil {
			return 0, fmt.Errorf("vhd: %w", err)
		}
		return len(p), nil
	}
	return img.eachBlock(p, off, img.readBlock)
}

// eachBlock runs fn over the pieces of p (at disk offset off) that fall in
// one block each, and returns the bytes of the pieces done before an
// error.
func (img *Image) eachBlock(p []byte, off int64, fn func(blk, in int64, q []byte) error) (int, error) {
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		blk, in := pos/img.blockSize, pos%img.blockSize
		n := min(int64(len(p)-done), img.blockSize-in)
		if err := fn(blk, in, p[done:done+int(n)]); err != nil {
			return done, err
		}
		done += int(n)
	}
	return done, nil
}

func (img *Image) readBlock(blk, in int64, p []byte) error {
	e, bm, err := img.lookup(blk)
	if err != nil {
		return err
	}
	base := blk * img.blockSize
	if e == batUnused {
		return img.readParent(p, base+in)
	}
	// Walk runs of sectors with the same bit.
	end := in + int64(len(p))
	for pos := in; pos < end; {
		s := pos / sectorSize
		set := img.bitTest(bm, s)
		runEnd := (s + 1) * sectorSize
		for runEnd < end && img.bitTest(bm, runEnd/sectorSize) == set {
			runEnd += sectorSize
		}
		runEnd = min(runEnd, end)
		q := p[pos-in : runEnd-in]
		if set {
			if err := hostfile.ReadFull(img.f, q, img.dataOff(e)+pos); err != nil {
				return fmt.Errorf("vhd: block %d: %w", blk, err)
			}
		} else if err := img.readParent(q, base+pos); err != nil {
			return err
		}
		pos = runEnd
	}
	return nil
}

// WriteAt writes to the disk. See the package doc for the order of
// data and metadata writes.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if err := img.enter(); err != nil {
		return 0, err
	}
	defer img.leave()
	if img.ro {
		return 0, image.ErrReadOnly
	}
	if err := image.CheckRange(off, len(p), img.size); err != nil {
		return 0, err
	}
	if img.hdr == nil {
		if err := hostfile.WriteFull(img.f, p, off); err != nil {
			return 0, fmt.Errorf("vhd: %w", err)
		}
		return len(p), nil
	}
	return img.eachBlock(p, off, img.writeBlock)
}

func (img *Image) allSet(bm []byte, s0, s1 int64) bool {
	for s := s0; s <= s1; s++ {
		if !img.bitTest(bm, s) {
			return false
		}
	}
	return true
}

// cowUnit is the granularity at which a differencing disk takes sectors
// from its parent: whole 4 KiB pages. libvhdi (vhdimount) reads a
// differencing disk per 4 KiB page and trusts the first marked sector of
// a page for the rest of it, so finer-grained bits would read wrong there.
const cowUnit = 4096

// run is a byte range of a block [start, end) to write from buf.
type run struct{ start, end int64 }

// writePlan widens a write for the sectors it newly claims: on a
// differencing disk to whole pages (the rest of each page copied from
// the parent), elsewhere to whole sectors (zeros). Sectors this layer
// already holds are never rewritten beyond the caller's bytes, since a
// plain write may be changing them concurrently.
func (img *Image) writePlan(blk int64, bm []byte, in int64, p []byte) (buf []byte, start int64, runs []run, s0, s1 int64, err error) {
	end := in + int64(len(p))
	unit := int64(sectorSize)
	if img.foot.Type == typeDiff {
		unit = cowUnit
	}
	start = in / unit * unit
	stop := min(roundUp(end, unit), img.blockSize)
	if lim := img.size - blk*img.blockSize; stop > lim {
		stop = roundUp(lim, sectorSize)
	}
	owned := func(s int64) bool { return bm != nil && img.bitTest(bm, s) }
	buf = make([]byte, stop-start)
	base := blk * img.blockSize
	// Parent data for the head and tail sectors not covered whole by p.
	if head := roundUp(in, sectorSize); head > start {
		if err := img.readParent(buf[:head-start], base+start); err != nil {
			return nil, 0, nil, 0, 0, err
		}
	}
	if tail := end / sectorSize * sectorSize; tail < stop {
		tail = max(tail, start)
		if err := img.readParent(buf[tail-start:], base+tail); err != nil {
			return nil, 0, nil, 0, 0, err
		}
	}
	copy(buf[in-start:], p)
	for s := start / sectorSize; s*sectorSize < stop; s++ {
		a, b := s*sectorSize, (s+1)*sectorSize
		if owned(s) {
			a, b = max(a, in), min(b, end)
		}
		if a >= b {
			continue
		}
		if k := len(runs) - 1; k >= 0 && runs[k].end == a {
			runs[k].end = b
		} else {
			runs = append(runs, run{a, b})
		}
	}
	return buf, start, runs, start / sectorSize, (stop - 1) / sectorSize, nil
}

func (img *Image) writeRuns(dataOff int64, buf []byte, start int64, runs []run) error {
	for _, r := range runs {
		if err := hostfile.WriteFull(img.f, buf[r.start-start:r.end-start], dataOff+r.start); err != nil {
			return err
		}
	}
	return nil
}

func (img *Image) writeBlock(blk, in int64, p []byte) error {
	s0, s1 := in/sectorSize, (in+int64(len(p))-1)/sectorSize
	e, bm, err := img.lookup(blk)
	if err != nil {
		return err
	}
	if e != batUnused && img.allSet(bm, s0, s1) {
		// Fast path: every sector is already this layer's.
		if err := hostfile.WriteFull(img.f, p, img.dataOff(e)+in); err != nil {
			return fmt.Errorf("vhd: block %d: %w", blk, err)
		}
		return nil
	}
	img.allocMu.Lock()
	defer img.allocMu.Unlock()
	e, bm, err = img.lookup(blk)
	if err != nil {
		return err
	}
	if e == batUnused {
		bm = nil
	}
	buf, start, runs, s0, s1, err := img.writePlan(blk, bm, in, p)
	if err != nil {
		return err
	}
	if e == batUnused {
		return img.allocateLocked(blk, buf, start, runs, s0, s1)
	}
	if err := img.writeRuns(img.dataOff(e), buf, start, runs); err != nil {
		return fmt.Errorf("vhd: block %d: %w", blk, err)
	}
	// The data must be durable before a bit claims it: otherwise a
	// crash could leave the bit set over stale sectors that hide the
	// parent's data. A disk without parent reads zeros in unmarked
	// sectors (blocks are born sparse, discards punch), so it can skip it.
	if img.foot.Type == typeDiff {
		if err := img.f.Sync(); err != nil {
			return err
		}
	}
	nbm := append([]byte(nil), bm...)
	for s := s0; s <= s1; s++ {
		img.bitSet(nbm, s)
	}
	return img.putBitmapLocked(blk, e, bm, nbm, s0, s1)
}

// putBitmapLocked writes the bitmap sectors that changed, then installs
// the new bitmap in memory.
func (img *Image) putBitmapLocked(blk int64, e uint32, old, nbm []byte, s0, s1 int64) error {
	// Byte range of the bitmap holding bits s0..s1, widened to sectors.
	b0, b1 := s0/8, s1/8
	if img.oldBits {
		b0, b1 = (s0>>5)*4, (s1>>5)*4+3
	}
	b0 = b0 / sectorSize * sectorSize
	b1 = roundUp(b1+1, sectorSize)
	if err := hostfile.WriteFull(img.f, nbm[b0:b1], int64(e)*sectorSize+b0); err != nil {
		return fmt.Errorf("vhd: write bitmap of block %d: %w", blk, err)
	}
	img.mu.Lock()
	img.cacheLocked(uint32(blk), nbm)
	img.mu.Unlock()
	return nil
}

// allocateLocked places a new block where the footer is now and
// publishes it in this order:
//
//  1. data at P+bitmap, and a new footer after the block   } fdatasync
//  2. the bitmap at P (overwriting the old footer)          } fdatasync
//  3. the BAT entry
//
// A crash before 3 leaves the block unreferenced (leaked space, a
// valid image with its footer at the end); after 3, everything the
// BAT entry points at is already on disk.
func (img *Image) allocateLocked(blk int64, buf []byte, start int64, runs []run, s0, s1 int64) error {
	pos := img.nextFree
	per := img.bmSize + img.blockSize
	if (pos+per)/sectorSize >= batUnused {
		return fmt.Errorf("vhd: %s: no room for block %d: a VHD file cannot grow past 2 TiB (use qcow2)", img.path, blk)
	}
	if err := img.refuseMetaWrite(pos, per+footerSize); err != nil {
		return err
	}
	if err := img.writeRuns(pos+img.bmSize, buf, start, runs); err != nil {
		return fmt.Errorf("vhd: block %d data: %w", blk, err)
	}
	if err := img.writeFooterLocked(pos + per); err != nil {
		return err
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	bm := make([]byte, img.bmSize)
	for s := s0; s <= s1; s++ {
		img.bitSet(bm, s)
	}
	if err := hostfile.WriteFull(img.f, bm, pos); err != nil {
		return fmt.Errorf("vhd: block %d bitmap: %w", blk, err)
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	var ent [4]byte
	e := uint32(pos / sectorSize)
	binary.BigEndian.PutUint32(ent[:], e)
	if err := hostfile.WriteFull(img.f, ent[:], int64(img.hdr.TableOffset)+4*blk); err != nil {
		return fmt.Errorf("vhd: BAT entry %d: %w", blk, err)
	}
	img.nextFree = pos + per
	img.mu.Lock()
	img.bat[blk] = e
	img.cacheLocked(uint32(blk), bm)
	img.mu.Unlock()
	return nil
}

// writeFooterLocked writes the footer at pos (the end of the file).
func (img *Image) writeFooterLocked(pos int64) error {
	b := make([]byte, footerSize)
	copy(b, img.foot.raw[:])
	if err := hostfile.WriteFull(img.f, b, pos); err != nil {
		return fmt.Errorf("vhd: write footer: %w", err)
	}
	img.nextFree = pos
	return nil
}

// Discard makes a range read as zeros. On a fixed disk the sectors are
// punched out of the file; on a dynamic disk their bitmap bits are
// cleared (after punching the data, so qemu, which ignores bitmaps,
// reads zeros too); a differencing disk cannot hide its parent's data
// without marking the sectors, so zeros are written.
func (img *Image) Discard(off, length int64) error {
	if err := img.enter(); err != nil {
		return err
	}
	defer img.leave()
	if img.ro {
		return image.ErrReadOnly
	}
	if err := image.CheckRange64(off, length, img.size); err != nil {
		return fmt.Errorf("vhd: discard: %w", err)
	}
	for length > 0 {
		n := length
		if img.hdr != nil {
			n = min(n, img.blockSize-off%img.blockSize)
		}
		if err := img.discardChunk(off, n); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

func (img *Image) zeroRange(off, n int64, write func([]byte, int64) error) error {
	z := make([]byte, min(n, 1<<20))
	for n > 0 {
		k := min(n, int64(len(z)))
		if err := write(z[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

func (img *Image) discardChunk(off, n int64) error {
	// Sector-aligned middle; the ragged edges get zeros written.
	a0 := roundUp(off, sectorSize)
	a1 := (off + n) / sectorSize * sectorSize
	writeZ := func(b []byte, o int64) error {
		if img.hdr == nil {
			return hostfile.WriteFull(img.f, b, o)
		}
		return img.writeBlock(o/img.blockSize, o%img.blockSize, b)
	}
	if a1 <= a0 || (img.hdr != nil && img.foot.Type == typeDiff) {
		return img.zeroRange(off, n, writeZ)
	}
	if off < a0 {
		if err := img.zeroRange(off, a0-off, writeZ); err != nil {
			return err
		}
	}
	if off+n > a1 {
		if err := img.zeroRange(a1, off+n-a1, writeZ); err != nil {
			return err
		}
	}
	if img.hdr == nil {
		return img.punch(a0, a1-a0, writeZ)
	}
	blk := a0 / img.blockSize
	img.allocMu.Lock()
	defer img.allocMu.Unlock()
	e, bm, err := img.lookup(blk)
	if err != nil || e == batUnused {
		return err
	}
	in0, in1 := a0%img.blockSize, a0%img.blockSize+(a1-a0)
	if err := img.punch(img.dataOff(e)+in0, in1-in0, func(b []byte, o int64) error { return hostfile.WriteFull(img.f, b, o) }); err != nil {
		return err
	}
	// Zeros before the cleared bits: qemu ignores bitmaps and must not
	// find the old data there after a crash.
	if err := img.f.Sync(); err != nil {
		return err
	}
	if img.batmap.valid && img.batmap.bits[blk>>3]&(0x80>>(blk&7)) != 0 {
		// The batmap says "full"; clear that first, a stale clear bit
		// only costs libvhd a bitmap read.
		img.batmap.bits[blk>>3] &^= 0x80 >> (blk & 7)
		if err := img.writeBatmapLocked(); err != nil {
			return err
		}
	}
	s0, s1 := in0/sectorSize, in1/sectorSize-1
	nbm := append([]byte(nil), bm...)
	for s := s0; s <= s1; s++ {
		img.bitClear(nbm, s)
	}
	return img.putBitmapLocked(blk, e, bm, nbm, s0, s1)
}

func (img *Image) writeBatmapLocked() error {
	if err := hostfile.WriteFull(img.f, img.batmap.bits, img.batmap.off); err != nil {
		return fmt.Errorf("vhd: write batmap: %w", err)
	}
	if err := hostfile.WriteFull(img.f, img.batmapHeader(), img.batmap.hdrOff); err != nil {
		return fmt.Errorf("vhd: write batmap header: %w", err)
	}
	return nil
}

// punch deallocates [off, off+n) of the file, or writes zeros there when
// the file system cannot.
func (img *Image) punch(off, n int64, writeZ func([]byte, int64) error) error {
	if err := img.f.PunchHole(off, n); err == nil {
		return nil
	}
	return img.zeroRange(off, n, writeZ)
}
