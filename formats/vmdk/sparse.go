package vmdk

import (
	"bytes"
	"compress/zlib"
	"container/list"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"sync"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// grainState is what a grain table entry says about one grain.
type grainState uint8

const (
	grainUnalloc    grainState = iota // falls through to the parent, else zeros
	grainZero                         // zeroed-grain entry (GTE 1): reads as zeros
	grainData                         // plain data at off
	grainCompressed                   // compressed grain (with marker if markers flag) at off
)

// gtable is one cached grain table.
type gtable struct {
	idx uint32
	e   []uint32
	// dirty: the file's copy may differ from e beyond single entries (a
	// new table, or a write-back that failed), so the whole table is
	// written at the next write-back.
	dirty bool
	// onDisk: the grain directory in the file names this table.
	onDisk  bool
	el      *list.Element
	pending int // allocations and write-backs in flight on this table
}

// sparse is one hosted sparse extent (a KDMV file). Safe for concurrent use:
// mu guards the grain-table cache, the allocation cursor and the in-flight
// set; data I/O happens outside it.
type sparse struct {
	f        hostfile.File
	name     string
	h        *sparseHeader
	readOnly bool
	gd, rgd  []uint32 // primary and redundant directories (rgd nil if none)
	// gtBytes is the size of one grain table.
	gtBytes int64

	// metaMu serialises writes of grain tables and directory entries to
	// the file. Each write-back copies what it writes from the cache while
	// holding it, so the last write of any entry carries its newest value.
	metaMu sync.Mutex
	gsync  hostfile.GroupSync

	// extMu guards durable: the file length known to be on disk. The file
	// is extended ahead of the grains in batches, one fdatasync each, so
	// an entry never names space past the durable end, and a new grain
	// reads as zeros until its data lands.
	extMu   sync.Mutex
	durable int64

	mu       sync.Mutex
	cond     sync.Cond
	cache    map[uint32]*gtable
	lru      list.List // of *gtable, front = most recent
	cacheCap int
	inflight map[uint64]struct{} // grains being allocated
	size     int64               // bytes in the file, including appended grains
	next     int64               // where the next grain goes
	meta     []metaSpan          // writable extents: every metadata structure, sorted

	zmu    sync.Mutex
	zcache map[uint64][]byte // decompressed grains, by grain index
}

const defaultGTCache = 1024

// openSparse reads and validates the header (following it to the footer for
// streams) and the grain directory.
func openSparse(f hostfile.File, name string, readOnly bool, cacheCap int) (*sparse, error) {
	size, err := f.Size()
	if err != nil {
		return nil, fmt.Errorf("vmdk: %s: %w", name, err)
	}
	buf := make([]byte, sectorSize)
	if err := hostfile.ReadFull(f, buf, 0); err != nil {
		return nil, fmtErr(0, "header", image.ErrCorrupt, "%s: reading header: %v", name, err)
	}
	h, err := parseSparseHeader(buf, 0)
	if err != nil {
		return nil, err
	}
	if h.GDOffset == gdAtEnd {
		// A stream: the header with the real directory offset sits in the
		// footer, one sector before the end-of-stream marker.
		if size < 3*sectorSize {
			return nil, fmtErr(size, "footer", image.ErrCorrupt, "%s: gd_offset says footer but the file has %d bytes", name, size)
		}
		off := size - 2*sectorSize
		if err := hostfile.ReadFull(f, buf, off); err != nil {
			return nil, fmtErr(off, "footer", image.ErrCorrupt, "%s: %v", name, err)
		}
		fh, err := parseSparseHeader(buf, off)
		if errors.Is(err, image.ErrWrongFormat) {
			return nil, fmtErr(off, "footer", image.ErrCorrupt, "%s: no footer header before the end-of-stream marker", name)
		}
		if err != nil {
			return nil, err
		}
		if fh.GDOffset == gdAtEnd {
			return nil, fmtErr(off+56, "gd_offset", image.ErrCorrupt, "%s: footer has no grain directory offset", name)
		}
		if fh.Capacity != h.Capacity || fh.GrainSize != h.GrainSize || fh.NumGTEsPerGT != h.NumGTEsPerGT {
			return nil, fmtErr(off, "footer", image.ErrCorrupt, "%s: footer header disagrees with the header", name)
		}
		h = fh
		if !readOnly {
			return nil, fmtErr(0, "gd_offset", image.ErrUnsupported, "%s: writing stream images with the directory at the end", name)
		}
	}
	if h.Flags&flagCompressed != 0 && !readOnly {
		return nil, fmtErr(8, "flags", image.ErrUnsupported, "%s: writing compressed (streamOptimized) extents; open read-only or convert", name)
	}
	s := &sparse{
		f: f, name: name, h: h, readOnly: readOnly,
		gtBytes:  int64(h.NumGTEsPerGT) * 4,
		cache:    map[uint32]*gtable{},
		cacheCap: max(cacheCap, 4),
		inflight: map[uint64]struct{}{},
		size:     size,
		durable:  size,
		// New grains go after everything in the file and never below the
		// data area, even when the file is shorter than its header says.
		next:   max((size+sectorSize-1)&^(sectorSize-1), int64(min(h.GrainOffset, math.MaxInt64/sectorSize))*sectorSize),
		zcache: map[uint64][]byte{},
	}
	s.cond.L = &s.mu
	n := h.gdEntries()
	if s.gd, err = s.readDir(h.GDOffset, n, 56, "gd_offset"); err != nil {
		return nil, err
	}
	if h.Flags&flagRedundant != 0 && h.RGDOffset != 0 {
		if s.rgd, err = s.readDir(h.RGDOffset, n, 48, "rgd_offset"); err != nil {
			return nil, err
		}
	}
	if !readOnly {
		if err := s.buildMeta(); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// readDir reads n directory entries at sector off, checking they lie
// inside the file before allocating room for them.
func (s *sparse) readDir(off, n uint64, field int64, fname string) ([]uint32, error) {
	if n == 0 {
		return nil, nil
	}
	if off == 0 || off > uint64(s.size)/sectorSize || n*4 > uint64(s.size)-off*sectorSize {
		return nil, fmtErr(field, fname, image.ErrCorrupt, "%s: grain directory of %d entries at sector %d lies outside the %d-byte file", s.name, n, off, s.size)
	}
	b := make([]byte, n*4)
	if err := hostfile.ReadFull(s.f, b, int64(off)*sectorSize); err != nil {
		return nil, fmtErr(int64(off)*sectorSize, fname, image.ErrCorrupt, "%s: %v", s.name, err)
	}
	d := make([]uint32, n)
	for i := range d {
		d[i] = binary.LittleEndian.Uint32(b[4*i:])
	}
	return d, nil
}

// tableLocked returns grain table i, loading it; nil if the directory
// entry is 0 (no table: every grain unallocated).
func (s *sparse) tableLocked(i uint32) (*gtable, error) {
	if t := s.cache[i]; t != nil {
		s.lru.MoveToFront(t.el)
		return t, nil
	}
	if int(i) >= len(s.gd) {
		return nil, nil
	}
	sec := s.gd[i]
	if sec == 0 {
		return nil, nil
	}
	off := int64(sec) * sectorSize
	if off+s.gtBytes > s.size {
		return nil, fmtErr(int64(s.h.GDOffset)*sectorSize+4*int64(i), "grain directory", image.ErrCorrupt,
			"%s: grain table %d at sector %d lies past the end of the file", s.name, i, sec)
	}
	b := make([]byte, s.gtBytes)
	if err := hostfile.ReadFull(s.f, b, off); err != nil {
		return nil, fmtErr(off, "grain table", image.ErrCorrupt, "%s: %v", s.name, err)
	}
	t := &gtable{idx: i, e: make([]uint32, s.h.NumGTEsPerGT), onDisk: true}
	for j := range t.e {
		t.e[j] = binary.LittleEndian.Uint32(b[4*j:])
	}
	s.evictLocked()
	t.el = s.lru.PushFront(t)
	s.cache[i] = t
	return t, nil
}

// evictLocked drops idle tables that match the file past the cache size.
// A table not yet written back stays: only the cache holds its entries.
func (s *sparse) evictLocked() {
	for el := s.lru.Back(); el != nil && len(s.cache) >= s.cacheCap; {
		prev := el.Prev()
		t := el.Value.(*gtable)
		if !t.dirty && t.onDisk && t.pending == 0 {
			s.lru.Remove(el)
			delete(s.cache, t.idx)
		}
		el = prev
	}
}

// lookupLocked says where grain g is.
func (s *sparse) lookupLocked(g uint64) (grainState, int64, error) {
	per := uint64(s.h.NumGTEsPerGT)
	ti := g / per
	if ti > math.MaxUint32 {
		return grainUnalloc, 0, nil
	}
	t, err := s.tableLocked(uint32(ti))
	if err != nil || t == nil {
		return grainUnalloc, 0, err
	}
	return s.decode(t.e[g%per], g)
}

func (s *sparse) decode(v uint32, g uint64) (grainState, int64, error) {
	switch {
	case v == 0:
		return grainUnalloc, 0, nil
	case v == 1 && s.h.Flags&flagZeroGrain != 0:
		return grainZero, 0, nil
	}
	off := int64(v) * sectorSize
	if uint64(v) < s.h.GrainOffset || off >= s.size {
		return 0, 0, fmtErr(-1, "grain table", image.ErrCorrupt,
			"%s: grain %d at sector %d lies outside the data area [%d, %d)", s.name, g, v, s.h.GrainOffset, s.size/sectorSize)
	}
	if s.h.Flags&flagCompressed != 0 {
		return grainCompressed, off, nil
	}
	if !s.readOnly {
		if err := s.checkGrainLocked(g, off); err != nil {
			return 0, 0, err
		}
	}
	return grainData, off, nil
}

// readGrain fills p from grain g at offset in within the grain. Unallocated
// grains are left to the caller (ok=false).
func (s *sparse) readGrain(p []byte, g uint64, in int64) (ok bool, err error) {
	s.mu.Lock()
	st, off, err := s.lookupLocked(g)
	s.mu.Unlock()
	if err != nil {
		return false, err
	}
	switch st {
	case grainUnalloc:
		return false, nil
	case grainZero:
		clear(p)
		return true, nil
	case grainCompressed:
		data, err := s.inflate(g, off)
		if err != nil {
			return false, err
		}
		copy(p, data[in:])
		return true, nil
	}
	n, err := s.f.ReadAt(p, off+in)
	if n < len(p) {
		if err != nil && err != io.EOF {
			return false, fmt.Errorf("vmdk: %s: read grain %d: %w", s.name, g, err)
		}
		// The last grain of a file may be short; the rest reads as zeros.
		clear(p[n:])
	}
	return true, nil
}

const zcacheMax = 16

// inflate returns grain g, decompressed, from its marker at off.
func (s *sparse) inflate(g uint64, off int64) ([]byte, error) {
	s.zmu.Lock()
	if b, ok := s.zcache[g]; ok {
		s.zmu.Unlock()
		return b, nil
	}
	s.zmu.Unlock()
	gb := s.h.grainBytes()
	// Deflate never grows data by more than a few bytes per 16 KiB block.
	limit := gb + gb/8 + 1024
	var comp []byte
	if s.h.Flags&flagMarkers != 0 {
		var m [12]byte
		if err := hostfile.ReadFull(s.f, m[:], off); err != nil {
			return nil, fmtErr(off, "grain marker", image.ErrCorrupt, "%s: grain %d: %v", s.name, g, err)
		}
		lba := binary.LittleEndian.Uint64(m[:])
		n := int64(binary.LittleEndian.Uint32(m[8:]))
		if lba != g*s.h.GrainSize {
			return nil, fmtErr(off, "grain marker", image.ErrCorrupt, "%s: grain %d marker names sector %d, want %d", s.name, g, lba, g*s.h.GrainSize)
		}
		if n == 0 || n > limit || n > s.size-off-12 {
			return nil, fmtErr(off+8, "grain marker", image.ErrCorrupt, "%s: grain %d compressed size %d", s.name, g, n)
		}
		comp = make([]byte, n)
		if err := hostfile.ReadFull(s.f, comp, off+12); err != nil {
			return nil, fmtErr(off+12, "grain", image.ErrCorrupt, "%s: grain %d: %v", s.name, g, err)
		}
	} else {
		n := min(limit, s.size-off)
		comp = make([]byte, n)
		m, err := s.f.ReadAt(comp, off)
		if m == 0 && err != nil {
			return nil, fmt.Errorf("vmdk: %s: grain %d: %w", s.name, g, err)
		}
		comp = comp[:m]
	}
	zr, err := zlib.NewReader(bytes.NewReader(comp))
	if err != nil {
		return nil, fmtErr(off, "grain", image.ErrCorrupt, "%s: grain %d: %v", s.name, g, err)
	}
	out := make([]byte, gb)
	n, err := io.ReadFull(zr, out)
	switch {
	case err == io.ErrUnexpectedEOF || err == io.EOF:
		// A short final grain: the rest reads as zeros.
		clear(out[n:])
	case err != nil:
		return nil, fmtErr(off, "grain", image.ErrCorrupt, "%s: grain %d: inflate: %v", s.name, g, err)
	default:
		var one [1]byte
		if k, _ := zr.Read(one[:]); k > 0 {
			return nil, fmtErr(off, "grain", image.ErrCorrupt, "%s: grain %d inflates past %d bytes", s.name, g, gb)
		}
	}
	s.zmu.Lock()
	if len(s.zcache) >= zcacheMax {
		for k := range s.zcache {
			delete(s.zcache, k)
			break
		}
	}
	s.zcache[g] = out
	s.zmu.Unlock()
	return out, nil
}

// scan reports [rel, rel+n) of the extent as runs of one grain state,
// with offsets relative to rel. It takes the lock once per grain table
// (and skips a missing table whole), so mapping a large disk is cheap;
// fn runs without the lock held.
func (s *sparse) scan(rel, n int64, fn func(a, b int64, st grainState) error) error {
	gb := s.h.grainBytes()
	per := int64(s.h.NumGTEsPerGT)
	type run struct {
		a, b int64
		st   grainState
	}
	var runs []run
	add := func(a, b int64, st grainState) {
		if k := len(runs) - 1; k >= 0 && runs[k].st == st && runs[k].b == a {
			runs[k].b = b
			return
		}
		runs = append(runs, run{a, b, st})
	}
	for done := int64(0); done < n; {
		g := (rel + done) / gb
		ti := g / per
		tEnd := min((ti+1)*per*gb-rel, n) // end of this table's span
		s.mu.Lock()
		var t *gtable
		var err error
		if ti <= math.MaxUint32 {
			t, err = s.tableLocked(uint32(ti))
		}
		for err == nil && done < tEnd {
			x := rel + done
			k := min(gb-x%gb, tEnd-done)
			st := grainUnalloc
			if t != nil {
				st, _, err = s.decode(t.e[(x/gb)%per], uint64(x/gb))
			}
			add(done, done+k, st)
			done += k
		}
		s.mu.Unlock()
		if err != nil {
			return err
		}
		// Hand over all but the last run, which may continue.
		for _, r := range runs[:len(runs)-1] {
			if err := fn(r.a, r.b, r.st); err != nil {
				return err
			}
		}
		runs = runs[len(runs)-1:]
	}
	for _, r := range runs {
		if err := fn(r.a, r.b, r.st); err != nil {
			return err
		}
	}
	return nil
}
