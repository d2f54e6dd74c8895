package vhd

// Allocation maps: which ranges a disk holds, which its parent holds,
// and a fixed disk's host-file holes.

import (
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// Map describes [off, off+length) as extents: Data for sectors this
// layer holds (Depth 0), the parent's extents one level deeper, and
// Hole (Depth 0) where a disk without parent has nothing.
func (img *Image) Map(off, length int64) ([]image.Extent, error) {
	if err := img.enter(); err != nil {
		return nil, err
	}
	defer img.leave()
	if err := image.CheckRange64(off, length, img.size); err != nil {
		return nil, fmt.Errorf("vhd: map: %w", err)
	}
	var out []image.Extent
	add := func(x image.Extent) { out = image.AppendExtent(out, x) }
	if img.hdr == nil {
		img.mapFixed(off, length, add)
		return out, nil
	}
	end := off + length
	for pos := off; pos < end; {
		blk, in := pos/img.blockSize, pos%img.blockSize
		n := min(end-pos, img.blockSize-in)
		e, bm, err := img.lookup(blk)
		if err != nil {
			return nil, err
		}
		if e == batUnused {
			if err := img.mapParent(pos, n, add); err != nil {
				return nil, err
			}
		} else {
			for q := pos; q < pos+n; {
				s := (q - blk*img.blockSize) / sectorSize
				set := img.bitTest(bm, s)
				r := blk*img.blockSize + (s+1)*sectorSize
				for r < pos+n && img.bitTest(bm, (r-blk*img.blockSize)/sectorSize) == set {
					r += sectorSize
				}
				r = min(r, pos+n)
				if set {
					add(image.Extent{Offset: q, Length: r - q, Kind: image.Data})
				} else if err := img.mapParent(q, r-q, add); err != nil {
					return nil, err
				}
				q = r
			}
		}
		pos += n
	}
	return out, nil
}

func (img *Image) mapParent(off, n int64, add func(image.Extent)) error {
	if img.noParent {
		add(image.Extent{Offset: off, Length: n, Kind: image.Hole, Depth: 1})
		return nil
	}
	if img.parent == nil {
		add(image.Extent{Offset: off, Length: n, Kind: image.Hole})
		return nil
	}
	ps := img.parent.Size()
	if off < ps {
		k := min(n, ps-off)
		xs, err := img.parent.Map(off, k)
		if err != nil {
			return fmt.Errorf("vhd: map parent: %w", err)
		}
		for _, x := range xs {
			x.Depth++
			add(x)
		}
		off += k
		n -= k
	}
	if n > 0 {
		add(image.Extent{Offset: off, Length: n, Kind: image.Hole, Depth: 1})
	}
	return nil
}

// mapFixed reports a fixed disk's file holes as Zero (they read as
// zeros but belong to the disk) and the rest as Data.
func (img *Image) mapFixed(off, length int64, add func(image.Extent)) {
	sf, ok := img.f.(hostfile.Sparse)
	end := off + length
	for pos := off; pos < end; {
		if !ok {
			add(image.Extent{Offset: pos, Length: end - pos, Kind: image.Data})
			return
		}
		d, err := sf.DataAfter(pos)
		if err != nil {
			ok = false
			continue
		}
		if d > pos {
			z := min(d, end)
			add(image.Extent{Offset: pos, Length: z - pos, Kind: image.Zero})
			pos = z
			continue
		}
		h, err := sf.HoleAfter(pos)
		if err != nil || h <= pos {
			ok = false
			continue
		}
		h = min(h, end)
		add(image.Extent{Offset: pos, Length: h - pos, Kind: image.Data})
		pos = h
	}
}
