package vmdk

import (
	"encoding/binary"
	"fmt"
	"sort"

	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// CheckOptions tune Check.
type CheckOptions struct {
	AllowUnconfinedExtents bool // as Options.AllowUnconfinedExtents

	fs hostfile.FS
}

// CheckResult is what `image check` reports. An image is clean when
// Corruptions is 0; leaks waste space but lose nothing (the format has no
// free-space map, so a grain written before a crash and never published,
// or a discarded grain, stays allocated).
type CheckResult struct {
	Corruptions     int      `json:"corruptions"`
	Leaks           int      `json:"leaks"` // leaked grain-sized runs
	LeakedBytes     int64    `json:"leaked_bytes"`
	AllocatedGrains int64    `json:"allocated_grains"`
	TotalGrains     int64    `json:"total_grains"`
	Problems        []string `json:"problems,omitempty"` // corruptions, one line each
	Warnings        []string `json:"warnings,omitempty"` // e.g. redundant table out of step
}

func (r *CheckResult) corrupt(format string, args ...any) {
	r.Corruptions++
	if len(r.Problems) < 100 {
		r.Problems = append(r.Problems, fmt.Sprintf(format, args...))
	}
}

func (r *CheckResult) warn(format string, args ...any) {
	if len(r.Warnings) < 100 {
		r.Warnings = append(r.Warnings, fmt.Sprintf(format, args...))
	}
}

// Check walks every grain directory and table of the image: tables and
// grains must lie inside the file and outside the metadata, no two grains
// may overlap, the redundant tables should match the primary ones, and
// space no grain uses is counted as leaked. An image that cannot be opened
// at all gives an error (a *image.FormatError for a corrupt header or
// descriptor). The parent is not opened.
func Check(path string, opts CheckOptions) (*CheckResult, error) {
	img, err := Open(path, Options{ReadOnly: true, AllowUnconfinedExtents: opts.AllowUnconfinedExtents, fs: opts.fs, skipBacking: true})
	if err != nil {
		return nil, err
	}
	defer img.Close()
	r := &CheckResult{}
	for _, e := range img.extents {
		switch {
		case e.sp != nil:
			checkSparse(e.sp, r)
		case e.f != nil:
			if n, err := e.f.Size(); err == nil && n < e.off+e.length {
				r.warn("%s: flat file has %d bytes, extent needs %d (the rest reads as zeros)", e.d.File, n, e.off+e.length)
			}
		}
	}
	return r, nil
}

type span struct{ start, end int64 }

func checkSparse(s *sparse, r *CheckResult) {
	h := s.h
	gb := h.grainBytes()
	compressed := h.Flags&flagCompressed != 0
	r.TotalGrains += int64((h.Capacity + h.GrainSize - 1) / h.GrainSize)
	var used []span
	gdLen := int64(len(s.gd)) * 4
	for _, at := range []uint64{h.GDOffset, h.RGDOffset} {
		if at != 0 && at != gdAtEnd {
			used = append(used, span{int64(at) * sectorSize, int64(at)*sectorSize + gdLen})
		}
	}
	readGT := func(sec uint32) ([]byte, error) {
		off := int64(sec) * sectorSize
		if sec == 0 || off+s.gtBytes > s.size {
			return nil, fmt.Errorf("lies past the end of the file")
		}
		b := make([]byte, s.gtBytes)
		if err := hostfile.ReadFull(s.f, b, off); err != nil {
			return nil, err
		}
		used = append(used, span{off, off + s.gtBytes})
		return b, nil
	}
	per := uint64(h.NumGTEsPerGT)
	// A table named twice would be walked twice; refusing repeats keeps the
	// walk (and the span list) bounded by the file's size.
	seen := map[uint32]int{}
	for i, sec := range s.gd {
		if sec == 0 {
			if s.rgd != nil && s.rgd[i] != 0 {
				r.warn("%s: grain table %d: primary directory entry 0, redundant %d", s.name, i, s.rgd[i])
			}
			continue
		}
		if j, dup := seen[sec]; dup {
			r.corrupt("%s: grain tables %d and %d share sector %d", s.name, j, i, sec)
			continue
		}
		seen[sec] = i
		if s.rgd != nil && s.rgd[i] != 0 {
			if j, dup := seen[s.rgd[i]]; dup {
				r.corrupt("%s: redundant grain table %d shares sector %d with table %d", s.name, i, s.rgd[i], j)
				continue
			}
			seen[s.rgd[i]] = i
		}
		t, err := readGT(sec)
		if err != nil {
			r.corrupt("%s: grain table %d at sector %d: %v", s.name, i, sec, err)
			continue
		}
		var rt []byte
		switch {
		case s.rgd == nil:
		case s.rgd[i] == 0:
			// The primary entry is written first and the redundant one
			// after it, unsynced between: a power cut may keep only the
			// primary, which alone names the table on open.
			r.warn("%s: grain table %d: redundant directory entry 0, primary %d", s.name, i, sec)
		default:
			if rt, err = readGT(s.rgd[i]); err != nil {
				r.corrupt("%s: redundant grain table %d at sector %d: %v", s.name, i, s.rgd[i], err)
			}
		}
		for j := uint64(0); j < per; j++ {
			g := uint64(i)*per + j
			v := binary.LittleEndian.Uint32(t[4*j:])
			if rt != nil && binary.LittleEndian.Uint32(rt[4*j:]) != v {
				r.warn("%s: grain %d: redundant table says %d, primary %d", s.name, g, binary.LittleEndian.Uint32(rt[4*j:]), v)
			}
			if v == 0 || v == 1 && h.Flags&flagZeroGrain != 0 {
				continue
			}
			if g*h.GrainSize >= h.Capacity {
				r.corrupt("%s: grain %d past the capacity is allocated at sector %d", s.name, g, v)
				continue
			}
			r.AllocatedGrains++
			off := int64(v) * sectorSize
			switch {
			case uint64(v) < h.GrainOffset:
				r.corrupt("%s: grain %d at sector %d lies in the metadata (grains start at sector %d)", s.name, g, v, h.GrainOffset)
			case compressed && off+12 > s.size, !compressed && off+gb > s.size:
				r.corrupt("%s: grain %d at sector %d lies past the end of the %d-byte file", s.name, g, v, s.size)
			case !compressed:
				used = append(used, span{off, off + gb})
			default:
				if _, err := s.inflate(g, off); err != nil {
					r.corrupt("%s: grain %d: %v", s.name, g, err)
				}
			}
		}
	}
	if compressed {
		return // grains vary in size; overlaps and leaks are not tracked
	}
	sort.Slice(used, func(a, b int) bool { return used[a].start < used[b].start })
	cur := int64(h.GrainOffset) * sectorSize
	var prev span
	for k, u := range used {
		if k > 0 && u.start < prev.end {
			r.corrupt("%s: bytes [%d, %d) and [%d, %d) overlap", s.name, prev.start, prev.end, u.start, u.end)
		}
		if u.start > cur {
			leak(r, u.start-cur, gb)
		}
		cur = max(cur, u.end)
		if u.end > prev.end {
			prev = u
		}
	}
	if end := s.size; end > cur {
		leak(r, end-cur, gb)
	}
}

func leak(r *CheckResult, n, gb int64) {
	r.LeakedBytes += n
	r.Leaks += int((n + gb - 1) / gb)
}
