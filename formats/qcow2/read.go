package qcow2

// The read path: L1/L2 lookup through the table cache, classifying an
// entry, and reading data, compressed clusters and the backing file.

import (
	"encoding/binary"
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// ---- L1/L2 lookup ----------------------------------------------------------

// l2Locked returns the L2 table at off, reading it on a cache miss.
func (img *Image) l2Locked(off int64) (*l2Table, error) {
	m := &img.mu
	if t, ok := m.l2[off]; ok {
		m.lru.MoveToFront(t.elem)
		return t, nil
	}
	if off%img.cs != 0 || off < img.cs {
		return nil, corrupt(off, "l2_table", "L2 table offset %#x is not a cluster-aligned offset past the header", off)
	}
	if fe := img.fileEnd.Load(); off+img.cs > fe {
		return nil, corrupt(off, "l2_table", "L2 table at %#x ends past the end of the file (%d)", off, fe)
	}
	m.l2misses++
	raw := make([]byte, img.cs)
	if err := hostfile.ReadFull(img.f, raw, off); err != nil {
		return nil, fmt.Errorf("qcow2: read L2 table at %#x: %w", off, err)
	}
	t := &l2Table{off: off, e: make([]uint64, img.cs/8)}
	for i := range t.e {
		t.e[i] = binary.BigEndian.Uint64(raw[i*8:])
	}
	img.cacheL2Locked(t)
	return t, nil
}

func (img *Image) cacheL2Locked(t *l2Table) {
	m := &img.mu
	t.elem = m.lru.PushFront(t)
	m.l2[t.off] = t
	for m.lru.Len() > m.l2cap {
		old := m.lru.Remove(m.lru.Back()).(*l2Table)
		delete(m.l2, old.off)
	}
}

// l1Reserved are the L1 entry bits that must be zero.
const l1Reserved = uint64(0x7f000000000001ff)

// entryLocked returns the L2 entry of guest cluster vc (0 if no L2 table).
func (img *Image) entryLocked(vc int64) (uint64, error) {
	l1i := vc >> img.l2bits
	if l1i >= int64(len(img.mu.l1)) {
		return 0, corrupt(-1, "l1_table", "guest cluster %d is past the L1 table", vc)
	}
	l1e := img.mu.l1[l1i]
	if l1e&l1Reserved != 0 {
		return 0, corrupt(int64(img.hdr.l1Offset)+l1i*8, "l1_entry", "L1 entry %d (%#x) has reserved bits set", l1i, l1e)
	}
	off := int64(l1e & offsetMask)
	if off == 0 {
		return 0, nil
	}
	t, err := img.l2Locked(off)
	if err != nil {
		return 0, err
	}
	return t.e[vc&(1<<img.l2bits-1)], nil
}

// cluster kinds an L2 entry can describe.
type kind uint8

const (
	kUnalloc kind = iota
	kZero
	kNormal
	kCompressed
)

// classify decodes an L2 entry, validating it.
func (img *Image) classify(e uint64, vc int64) (kind, int64, error) {
	if e&entryCompressed != 0 {
		return kCompressed, 0, nil
	}
	off := int64(e & offsetMask)
	if e&0x3f000000000001fe != 0 {
		return 0, 0, corrupt(-1, "l2_entry", "guest cluster %d: L2 entry %#x has reserved bits set", vc, e)
	}
	if off != 0 && off&(img.cs-1) != 0 {
		return 0, 0, corrupt(-1, "l2_entry", "guest cluster %d: data offset %#x is not cluster-aligned", vc, off)
	}
	if e&entryZero != 0 {
		return kZero, off, nil
	}
	if off == 0 {
		return kUnalloc, 0, nil
	}
	if img.metaAtLocked(off >> img.cbits) {
		return 0, 0, corrupt(off, "l2_entry", "guest cluster %d: data cluster %#x overlaps the %v", vc, off, img.overlapLocked(off, img.cs, 0))
	}
	return kNormal, off, nil
}

// compressed descriptor: x = 62 - (cluster_bits - 8) low bits of host
// offset, then the count of additional 512-byte sectors up to bit 61.
func (img *Image) compressedSpan(e uint64) (off, n int64) {
	x := 62 - (img.cbits - 8)
	off = int64(e & (uint64(1)<<x - 1))
	sectors := int64((e>>x)&(uint64(1)<<(62-x)-1)) + 1
	return off, sectors*512 - off&511
}

// readCompressed inflates the compressed cluster e into dst (cluster-sized).
func (img *Image) readCompressed(e uint64, dst []byte) error {
	off, n := img.compressedSpan(e)
	fe := img.fileEnd.Load()
	if off >= fe || off < img.cs {
		return corrupt(off, "l2_entry", "compressed cluster at %#x is outside the file", off)
	}
	n = min(n, fe-off)
	buf := make([]byte, n) // n <= 2^(62-x) sectors <= 2 clusters + 512
	if err := hostfile.ReadFull(img.f, buf, off); err != nil {
		return fmt.Errorf("qcow2: read compressed cluster at %#x: %w", off, err)
	}
	if err := img.codec.decompress(dst, buf); err != nil {
		return corrupt(off, "compressed_cluster", "compressed cluster at %#x does not %s-decompress to %d bytes: %v", off, img.codec.name(), len(dst), err)
	}
	return nil
}

// ---- reads -----------------------------------------------------------------

type segment struct {
	k    kind
	v    int64  // guest offset
	n    int64  // length
	host int64  // kNormal: host offset of v
	e    uint64 // kCompressed: the entry
}

// segmentsLocked maps [off, off+n) to runs of one kind, merging runs that
// are contiguous on the host.
func (img *Image) segmentsLocked(off, n int64, out []segment) ([]segment, error) {
	for n > 0 {
		vc := off >> img.cbits
		in := off & (img.cs - 1)
		l := min(n, img.cs-in)
		e, err := img.entryLocked(vc)
		if err != nil {
			return out, err
		}
		k, host, err := img.classify(e, vc)
		if err != nil {
			return out, err
		}
		s := segment{k: k, v: off, n: l}
		switch k {
		case kNormal:
			s.host = host + in
		case kCompressed:
			s.e = e
		}
		if last := len(out) - 1; last >= 0 && out[last].k == k && k != kCompressed &&
			(k != kNormal || out[last].host+out[last].n == s.host) {
			out[last].n += l
		} else {
			out = append(out, s)
		}
		off += l
		n -= l
	}
	return out, nil
}

// ReadAt reads len(p) bytes at guest offset off.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if err := image.CheckRange(off, len(p), img.size); err != nil {
		return 0, err
	}
	img.io.RLock()
	defer img.io.RUnlock()
	img.mu.Lock()
	if img.mu.closed {
		img.mu.Unlock()
		return 0, image.ErrClosed
	}
	var arr [8]segment
	segs, err := img.segmentsLocked(off, int64(len(p)), arr[:0])
	img.mu.Unlock()
	if err != nil {
		return 0, err
	}
	for _, s := range segs {
		dst := p[s.v-off : s.v-off+s.n]
		if err := img.readSegment(s, dst); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

func (img *Image) readSegment(s segment, dst []byte) error {
	switch s.k {
	case kNormal:
		if err := hostfile.ReadZeroed(img.f, dst, s.host); err != nil {
			return fmt.Errorf("qcow2: read data at %#x: %w", s.host, err)
		}
	case kZero:
		clear(dst)
	case kUnalloc:
		return img.readBacking(dst, s.v)
	case kCompressed:
		img.zc.Lock()
		defer img.zc.Unlock()
		if img.zc.data == nil || img.zc.e != s.e {
			if img.zc.data == nil {
				img.zc.data = make([]byte, img.cs)
			}
			img.zc.e = 0
			if err := img.readCompressed(s.e, img.zc.data); err != nil {
				return err
			}
			img.zc.e = s.e
		}
		copy(dst, img.zc.data[s.v&(img.cs-1):])
	}
	return nil
}

// readBacking reads guest range [v, v+len(dst)) from the backing image;
// past its end (or without one) the range reads as zeros.
func (img *Image) readBacking(dst []byte, v int64) error {
	if err := image.ReadBacking(img.backing, dst, v); err != nil {
		return fmt.Errorf("qcow2: read backing file at %d: %w", v, err)
	}
	return nil
}

// ---- Map -------------------------------------------------------------------

// Map describes [off, off+length) as extents; unallocated runs are asked
// of the backing image with Depth+1.
func (img *Image) Map(off, length int64) ([]image.Extent, error) {
	if err := image.CheckRange64(off, length, img.size); err != nil {
		return nil, fmt.Errorf("qcow2: map: %w", err)
	}
	var out []image.Extent
	add := func(x image.Extent) { out = image.AppendExtent(out, x) }
	const chunk = 64 << 20 // bound the segment list per lock hold
	for pos := off; pos < off+length; {
		n := min(chunk, off+length-pos)
		img.mu.Lock()
		if img.mu.closed {
			img.mu.Unlock()
			return nil, image.ErrClosed
		}
		segs, err := img.segmentsLocked(pos, n, nil)
		img.mu.Unlock()
		if err != nil {
			return nil, err
		}
		for _, s := range segs {
			switch s.k {
			case kNormal, kCompressed:
				add(image.Extent{Offset: s.v, Length: s.n, Kind: image.Data})
			case kZero:
				add(image.Extent{Offset: s.v, Length: s.n, Kind: image.Zero})
			case kUnalloc:
				if img.backing == nil {
					add(image.Extent{Offset: s.v, Length: s.n, Kind: image.Hole})
					continue
				}
				in := max(min(s.n, img.bsize-s.v), 0)
				if in > 0 {
					bx, err := img.backing.Map(s.v, in)
					if err != nil {
						return nil, fmt.Errorf("qcow2: map backing file: %w", err)
					}
					for _, x := range bx {
						x.Depth++
						add(x)
					}
				}
				add(image.Extent{Offset: s.v + in, Length: s.n - in, Kind: image.Hole, Depth: 1})
			}
		}
		pos += n
	}
	return out, nil
}
