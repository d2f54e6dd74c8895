package rbd

import (
	"cmp"
	"slices"

	"github.com/blktap-go/blktap/formats/image"
)

// fillHoles sorts and merges data runs and covers the gaps between them
// with holes, so the extents cover [off, off+length) exactly.
func fillHoles(data []image.Extent, off, length int64) []image.Extent {
	slices.SortFunc(data, func(a, b image.Extent) int { return cmp.Compare(a.Offset, b.Offset) })
	var out []image.Extent
	pos, end := off, off+length
	for _, e := range data {
		s, t := max(e.Offset, pos), min(e.Offset+e.Length, end)
		if t <= s {
			continue
		}
		if s > pos {
			out = append(out, image.Extent{Offset: pos, Length: s - pos, Kind: image.Hole})
		}
		if n := len(out); n > 0 && out[n-1].Kind == image.Data && out[n-1].Offset+out[n-1].Length == s {
			out[n-1].Length += t - s
		} else {
			out = append(out, image.Extent{Offset: s, Length: t - s, Kind: image.Data})
		}
		pos = t
	}
	if pos < end {
		out = append(out, image.Extent{Offset: pos, Length: end - pos, Kind: image.Hole})
	}
	return out
}
