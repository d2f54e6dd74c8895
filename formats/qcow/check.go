package qcow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// CheckOptions tunes Check.
type CheckOptions struct {
	// MaxProblems bounds the problems listed per kind (0 = 100); counts
	// stay exact.
	MaxProblems int
	// SkipCompressed skips inflating every compressed cluster.
	SkipCompressed bool
}

// Problem is one finding of Check.
type Problem struct {
	Offset  int64  `json:"offset"` // file offset of the field or range at fault, -1 if none
	Message string `json:"message"`
}

// CheckResult is what `image check` prints for a qcow image. qcow v1 has no
// refcounts, so a leak (file space no table references, e.g. from a crash
// mid-allocation) is harmless; corruptions make reads wrong or unsafe.
type CheckResult struct {
	Format             string    `json:"format"`
	Corruptions        []Problem `json:"corruptions"`
	CorruptionCount    int64     `json:"corruption_count"`
	Leaks              []Problem `json:"leaks"`
	LeakedClusters     int64     `json:"leaked_clusters"`
	L2Tables           int64     `json:"l2_tables"`
	AllocatedClusters  int64     `json:"allocated_clusters"`
	CompressedClusters int64     `json:"compressed_clusters"`
	TotalClusters      int64     `json:"total_clusters"`
	ImageEndOffset     int64     `json:"image_end_offset"`
	BackingFile        string    `json:"backing_file,omitempty"`
}

// OK reports whether no corruption was found.
func (r *CheckResult) OK() bool { return r.CorruptionCount == 0 }

// maxCheckClusters bounds Check's two bitmaps (2 x 64 MiB at the cap).
const maxCheckClusters = 1 << 29

type checker struct {
	r        *CheckResult
	max      int
	h        *header
	st       io.ReaderAt
	fileSize int64
	used     []uint64 // host clusters owned by metadata or a data cluster
	comp     []uint64 // host clusters touched by compressed data
	compRngs [][2]int64
	skipComp bool
	img      *Image // for decompress
}

func (c *checker) corrupt(off int64, format string, args ...any) {
	c.r.CorruptionCount++
	if len(c.r.Corruptions) < c.max {
		c.r.Corruptions = append(c.r.Corruptions, Problem{Offset: off, Message: fmt.Sprintf(format, args...)})
	}
}

// mark claims host clusters [off, off+n) for what; a cluster claimed twice
// is a corruption, and mark then reports false.
func (c *checker) mark(off, n int64, what string) bool {
	cs := c.h.clusterSize
	for cl := off / cs; cl*cs < off+n; cl++ {
		if cl >= int64(len(c.used))*64 {
			return true // past EOF: reported by the caller
		}
		w, b := cl/64, uint(cl%64)
		if c.used[w]&(1<<b) != 0 {
			c.corrupt(off, "host cluster %#x is used twice (second use: %s)", cl*cs, what)
			return false
		}
		c.used[w] |= 1 << b
	}
	return true
}

// Check examines the qcow image at path without opening its backing file:
// header fields, L1 and L2 entries inside the file, clusters referenced
// twice or overlapping metadata, compressed clusters that do not inflate,
// and unreferenced (leaked) space. A header too broken to read further is
// reported as a corruption; the error is for I/O failures and files that
// are not qcow images.
func Check(path string, opts CheckOptions) (*CheckResult, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("qcow: check: %w", err)
	}
	defer f.Close()
	return check(hostfile.OSFile{File: f}, opts)
}

func check(st hostfile.File, opts CheckOptions) (*CheckResult, error) {
	r := &CheckResult{Format: formatName, Corruptions: []Problem{}, Leaks: []Problem{}}
	size, err := st.Size()
	if err != nil {
		return nil, fmt.Errorf("qcow: check: %w", err)
	}
	r.ImageEndOffset = size
	buf := make([]byte, headerSize+xenHeaderSize)
	n, err := st.ReadAt(buf, 0)
	if err != nil && err != io.EOF {
		return nil, fmt.Errorf("qcow: check: %w", err)
	}
	h, err := parseHeader(buf[:n], size, func(p []byte, off int64) error { return hostfile.ReadFull(st, p, off) })
	if err != nil {
		var fe *image.FormatError
		if errors.Is(err, image.ErrCorrupt) && errors.As(err, &fe) {
			r.CorruptionCount = 1
			r.Corruptions = append(r.Corruptions, Problem{Offset: fe.Offset, Message: fe.Error()})
			return r, nil
		}
		return nil, err
	}
	r.BackingFile = h.backingName
	r.TotalClusters = int64((h.size + uint64(h.clusterSize) - 1) >> h.clusterBits)
	nClusters := (size + h.clusterSize - 1) / h.clusterSize
	if nClusters > maxCheckClusters {
		return nil, fmt.Errorf("qcow: check: %d host clusters exceed the %d this check can track: %w",
			nClusters, maxCheckClusters, image.ErrUnsupported)
	}
	c := &checker{r: r, max: opts.MaxProblems, h: h, st: st, fileSize: size,
		used: make([]uint64, (nClusters+63)/64), comp: make([]uint64, (nClusters+63)/64),
		skipComp: opts.SkipCompressed}
	if c.max <= 0 {
		c.max = 100
	}
	c.img = &Image{st: st, h: h, ro: true}
	l1End := int64(h.l1Offset) + h.l1Entries*8
	c.mark(0, l1End, "header and L1 table")

	raw := make([]byte, h.l1Entries*8)
	if err := hostfile.ReadFull(st, raw, int64(h.l1Offset)); err != nil {
		return nil, fmt.Errorf("qcow: check: reading L1: %w", err)
	}
	order := h.l1Order()
	table := make([]byte, h.l2TableBytes)
	for i := int64(0); i < h.l1Entries; i++ {
		l2off := order.Uint64(raw[i*8:])
		if l2off == 0 {
			continue
		}
		fieldOff := int64(h.l1Offset) + i*8
		if l2off&flagCompressed != 0 || l2off < uint64(l1End) || l2off > uint64(size) ||
			uint64(h.l2TableBytes) > uint64(size)-l2off {
			c.corrupt(fieldOff, "L1[%d]: L2 table offset %#x outside the file area after the L1 table (file is %d bytes)",
				i, l2off, size)
			continue
		}
		r.L2Tables++
		if !c.mark(int64(l2off), h.l2TableBytes, fmt.Sprintf("L2 table of L1[%d]", i)) {
			continue // its entries were checked, or are garbage; either way once is enough
		}
		if err := hostfile.ReadFull(st, table, int64(l2off)); err != nil {
			return nil, fmt.Errorf("qcow: check: reading L2 table %#x: %w", l2off, err)
		}
		for j := int64(0); j < h.l2Entries; j++ {
			e := binary.BigEndian.Uint64(table[j*8:])
			if e == 0 {
				continue
			}
			vc := i<<h.l2Bits | j
			c.entry(int64(l2off)+j*8, vc, e)
		}
	}
	// qemu pads the L1 to a multiple of 512 bytes: padding, not a leak.
	c.finish(int64(h.l1Offset) + alignUp(h.l1Entries*8, 512))
	return r, nil
}

func (c *checker) entry(fieldOff, vc int64, e uint64) {
	h, r := c.h, c.r
	vOff := vc << h.clusterBits
	if uint64(vOff) >= h.size {
		c.corrupt(fieldOff, "L2 entry for virtual offset %d, past the virtual size %d", vOff, h.size)
		return
	}
	l1End := h.l1Offset + uint64(h.l1Entries)*8
	if e&flagCompressed != 0 {
		r.CompressedClusters++
		off := e & (1<<h.compressedShift - 1)
		n := int64((e >> h.compressedShift) & uint64(h.clusterSize-1))
		if n == 0 || off < l1End || off > uint64(c.fileSize) || uint64(n) > uint64(c.fileSize)-off {
			c.corrupt(fieldOff, "compressed cluster of virtual offset %d: bytes [%#x, +%d) not inside the data area of the %d-byte file",
				vOff, off, n, c.fileSize)
			return
		}
		c.compRngs = append(c.compRngs, [2]int64{int64(off), int64(off) + n})
		if !c.skipComp {
			if _, err := c.img.decompress(e); err != nil {
				c.corrupt(fieldOff, "compressed cluster of virtual offset %d does not inflate: %v", vOff, err)
			}
		}
		return
	}
	r.AllocatedClusters++
	if e < l1End || e > uint64(c.fileSize) || uint64(h.clusterSize) > uint64(c.fileSize)-e {
		c.corrupt(fieldOff, "cluster of virtual offset %d at %#x: not inside the data area of the %d-byte file",
			vOff, e, c.fileSize)
		return
	}
	c.mark(int64(e), h.clusterSize, fmt.Sprintf("data of virtual offset %d", vOff))
}

// finish checks compressed ranges against each other and the exclusive
// clusters, then counts leaked clusters.
func (c *checker) finish(l1End int64) {
	cs := c.h.clusterSize
	slices.SortFunc(c.compRngs, func(a, b [2]int64) int { return int(min(max(a[0]-b[0], -1), 1)) })
	var prevEnd int64
	for _, rg := range c.compRngs {
		if rg[0] < prevEnd {
			c.corrupt(rg[0], "compressed data at %#x overlaps the compressed cluster before it", rg[0])
		}
		prevEnd = max(prevEnd, rg[1])
		for cl := rg[0] / cs; cl*cs < rg[1]; cl++ {
			w, b := cl/64, uint(cl%64)
			if c.used[w]&(1<<b) != 0 {
				c.corrupt(rg[0], "compressed data at %#x overlaps metadata or a data cluster", rg[0])
				break
			}
			c.comp[w] |= 1 << b
		}
	}
	n := (c.fileSize + cs - 1) / cs
	first := (l1End + cs - 1) / cs
	for cl := first; cl < n; {
		w, b := cl/64, uint(cl%64)
		if (c.used[w]|c.comp[w])&(1<<b) != 0 {
			cl++
			continue
		}
		start := cl
		for cl < n && (c.used[cl/64]|c.comp[cl/64])&(1<<uint(cl%64)) == 0 {
			cl++
		}
		// A last partial cluster is padding, not a leak.
		full := cl - start
		if cl == n && c.fileSize%cs != 0 {
			full--
		}
		if full <= 0 {
			continue
		}
		c.r.LeakedClusters += full
		if len(c.r.Leaks) < c.max {
			c.r.Leaks = append(c.r.Leaks, Problem{Offset: start * cs,
				Message: fmt.Sprintf("%d cluster(s) at %#x referenced by no table (leaked, harmless)", full, start*cs)})
		}
	}
}
