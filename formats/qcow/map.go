package qcow

import (
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
)

// Map describes [off, off+length) as ordered, contiguous extents. Clusters
// of this image are Data at depth 0; unallocated runs are described by the
// backing image's Map with its depths plus one (Hole at depth 1 past the
// backing image's end), or are Hole at depth 0 without a backing file.
func (img *Image) Map(off, length int64) ([]image.Extent, error) {
	if err := img.checkOpen(); err != nil {
		return nil, err
	}
	if off < 0 || length < 0 || off > img.Size() || length > img.Size()-off {
		return nil, fmt.Errorf("%w: map offset %d length %d size %d", image.ErrOutOfRange, off, length, img.Size())
	}
	var out []image.Extent
	push := func(e image.Extent) { out = image.AppendExtent(out, e) }
	end := off + length
	pos := off
	for pos < end {
		// One lock per L2 table's worth of clusters; runs of the same kind.
		unalloc, runEnd, err := img.scan(pos, end)
		if err != nil {
			return nil, err
		}
		if !unalloc {
			push(image.Extent{Offset: pos, Length: runEnd - pos, Kind: image.Data})
		} else if err := img.mapBacking(pos, runEnd, push); err != nil {
			return nil, err
		}
		pos = runEnd
	}
	return out, nil
}

// scan returns whether the cluster holding pos is unallocated and where
// the run of clusters of that same state ends (capped at end and at the
// end of pos's L2 table).
func (img *Image) scan(pos, end int64) (unalloc bool, runEnd int64, err error) {
	h := img.h
	vc := pos >> h.clusterBits
	l1i := vc >> h.l2Bits
	tableEnd := min(end, ((l1i+1)<<h.l2Bits)<<h.clusterBits)
	img.mu.Lock()
	defer img.mu.Unlock()
	l2off := img.mu.l1[l1i]
	if l2off == 0 {
		return true, tableEnd, nil
	}
	t, err := img.l2Locked(l2off)
	if err != nil {
		return false, 0, err
	}
	unalloc = t[vc&(h.l2Entries-1)] == 0
	for {
		vc++
		next := vc << h.clusterBits
		if next >= tableEnd {
			return unalloc, tableEnd, nil
		}
		if (t[vc&(h.l2Entries-1)] == 0) != unalloc {
			return unalloc, next, nil
		}
	}
}

func (img *Image) mapBacking(from, to int64, push func(image.Extent)) error {
	if img.backing == nil {
		push(image.Extent{Offset: from, Length: to - from, Kind: image.Hole, Depth: 0})
		return nil
	}
	bsize := img.backing.Size()
	if from < bsize {
		bto := min(to, bsize)
		ext, err := img.backing.Map(from, bto-from)
		if err != nil {
			return fmt.Errorf("qcow: mapping backing file: %w", err)
		}
		for _, e := range ext {
			e.Depth++
			push(e)
		}
		from = bto
	}
	if from < to {
		push(image.Extent{Offset: from, Length: to - from, Kind: image.Hole, Depth: 1})
	}
	return nil
}

// Info is what `image info` prints about a qcow image.
type Info struct {
	Format            string     `json:"format"` // "qcow"
	Version           int        `json:"version"`
	VirtualSize       int64      `json:"virtual_size"`
	ClusterSize       int64      `json:"cluster_size"`
	L2Bits            int        `json:"l2_bits"`
	L1TableOffset     int64      `json:"l1_table_offset"`
	L1Entries         int64      `json:"l1_entries"`
	BackingFile       string     `json:"backing_file,omitempty"`
	BackingFileFormat string     `json:"backing_file_format,omitempty"` // never stored by qcow v1
	MTime             uint32     `json:"mtime"`
	Encrypted         bool       `json:"encrypted"` // always false: encrypted images are refused
	Dirty             bool       `json:"dirty"`     // always false: qcow v1 has no dirty flag
	FileSize          int64      `json:"file_size"` // bytes in the file (allocation pointer)
	Xen               *XenHeader `json:"blktap_extension,omitempty"`
}

// XenHeader describes blktap1's extension header (docs/WIRE.md, section "QCOW").
type XenHeader struct {
	Checksum        uint32 `json:"checksum"`
	MinClusterAlloc uint32 `json:"min_cluster_alloc"`
	Flags           uint32 `json:"flags"`
	Sparse          bool   `json:"sparse"`
	L1BigEndian     bool   `json:"l1_big_endian"`
}

// Info reports the image's header facts.
func (img *Image) Info() Info {
	h := img.h
	img.mu.Lock()
	eof := img.mu.eof
	img.mu.Unlock()
	in := Info{
		Format:        formatName,
		Version:       int(h.version),
		VirtualSize:   int64(h.size),
		ClusterSize:   h.clusterSize,
		L2Bits:        int(h.l2Bits),
		L1TableOffset: int64(h.l1Offset),
		L1Entries:     h.l1Entries,
		BackingFile:   h.backingName,
		MTime:         h.mtime,
		FileSize:      eof,
	}
	if x := h.xen; x != nil {
		in.Xen = &XenHeader{Checksum: x.Checksum, MinClusterAlloc: x.MinClusterAlloc, Flags: x.Flags,
			Sparse: x.Flags&xenFlagSparse != 0, L1BigEndian: x.Flags&xenFlagL1BigEndian != 0}
	}
	return in
}
