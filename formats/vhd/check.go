package vhd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"slices"
	"sort"
	"time"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// CheckOptions tune Check.
type CheckOptions struct {
	// Repair rewrites a missing or bad footer at the end of a dynamic
	// disk from its good copy at offset 0 (what a crash between an
	// allocation's two syncs, or a truncated copy, leaves).
	Repair bool
	// Backing, when set, opens a differencing disk's parent so its uuid
	// can be compared with the one the child records.
	Backing image.OpenFunc
	// Now is the clock for "timestamp in the future" (nil: time.Now).
	Now func() time.Time
}

// CheckResult is what `image check` prints. Corruptions make the image
// unsafe to use; warnings and leaks do not.
type CheckResult struct {
	Format          string   `json:"format"`
	Subformat       string   `json:"subformat,omitempty"`
	Corruptions     []string `json:"corruptions,omitempty"`
	Warnings        []string `json:"warnings,omitempty"`
	Repaired        []string `json:"repaired,omitempty"`
	LeakedBytes     int64    `json:"leaked_bytes"`
	AllocatedBlocks int      `json:"allocated_blocks"`
	TotalBlocks     int      `json:"total_blocks"`
}

// OK reports whether no corruption was found.
func (r *CheckResult) OK() bool { return len(r.Corruptions) == 0 }

// Check examines the VHD at path the way vhd-util check does: footers
// and their checksums, the dynamic header, BAT entries inside the file
// and clear of metadata and of each other, the batmap, parent locators,
// and per-block bitmaps. The error is for I/O failures and files that
// are not VHDs at all; problems in a VHD are in the result.
func Check(path string, opts CheckOptions) (*CheckResult, error) {
	flag := os.O_RDONLY
	if opts.Repair {
		flag = os.O_RDWR
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("vhd: check %s: %w", path, err)
	}
	defer f.Close()
	return checkFile(hostfile.OSFile{File: f}, path, opts)
}

type checker struct {
	f    hostfile.File
	size int64
	r    *CheckResult
	now  time.Time
}

func (c *checker) bad(format string, a ...any) {
	c.r.Corruptions = append(c.r.Corruptions, fmt.Sprintf(format, a...))
}
func (c *checker) warn(format string, a ...any) {
	c.r.Warnings = append(c.r.Warnings, fmt.Sprintf(format, a...))
}

func checkFile(f hostfile.File, path string, opts CheckOptions) (*CheckResult, error) {
	size, err := f.Size()
	if err != nil {
		return nil, err
	}
	now := time.Now
	if opts.Now != nil {
		now = opts.Now
	}
	c := &checker{f: f, size: size, r: &CheckResult{Format: "vhd"}, now: now()}
	if size < footerSize {
		return nil, fmtErr(image.ErrWrongFormat, -1, "", "file of %d bytes is too small for a VHD", size)
	}
	if size%sectorSize != 0 && size%sectorSize != 511 {
		c.bad("file size %d is not a whole number of sectors", size)
	}
	endOff := size - footerSize
	if size%sectorSize == 511 {
		endOff = size - 511
		c.warn("short (511-byte) footer at the end")
	}
	buf := make([]byte, footerSize)
	n, _ := f.ReadAt(buf, endOff)
	if n < 511 {
		return nil, fmt.Errorf("vhd: check: cannot read the footer")
	}
	primary, perr := parseFooter(buf, endOff)
	copyBuf := make([]byte, footerSize)
	if err := hostfile.ReadFull(f, copyBuf, 0); err != nil {
		return nil, err
	}
	backup, berr := parseFooter(copyBuf, 0)
	ft := primary
	switch {
	case perr == nil:
	case berr == nil && backup.Type != typeFixed:
		c.bad("primary footer invalid: %v", perr)
		ft = backup
	case errors.Is(perr, image.ErrWrongFormat) && (berr == nil || errors.Is(berr, image.ErrWrongFormat)):
		return nil, perr
	default:
		c.bad("primary footer invalid: %v", perr)
		return c.r, nil
	}
	c.checkFooter(ft, "footer")
	vsize, _ := ft.virtualSize()
	switch ft.Type {
	case typeFixed:
		c.r.Subformat = "fixed"
		if ft.CurrentSize > uint64(size) || uint64(size)-ft.CurrentSize < 511 {
			c.bad("fixed disk of %d bytes does not fit a file of %d bytes", ft.CurrentSize, size)
		}
		return c.r, nil
	case typeDynamic:
		c.r.Subformat = "dynamic"
	case typeDiff:
		c.r.Subformat = "differencing"
	}
	if perr == nil {
		if berr != nil {
			c.bad("backup footer invalid: %v", berr)
		} else if !bytes.Equal(buf[:footerSize], copyBuf) {
			c.bad("primary and backup footers do not match")
		}
	}
	if ft.DataOffset < footerSize || ft.DataOffset%sectorSize != 0 || ft.DataOffset > uint64(size) || uint64(size)-ft.DataOffset < headerSize {
		c.bad("footer data offset %d is not a header inside the file", int64(ft.DataOffset))
		return c.r, nil
	}
	hb := make([]byte, headerSize)
	if err := hostfile.ReadFull(f, hb, int64(ft.DataOffset)); err != nil {
		return nil, err
	}
	h, err := parseHeader(hb, int64(ft.DataOffset))
	if err != nil {
		c.bad("header is invalid: %v", err)
		return c.r, nil
	}
	if !h.reservedZero {
		c.bad("header is invalid: reserved bits set")
	}
	if h.DataOffset != ^uint64(0) {
		c.bad("header data offset %#x is not all ones", h.DataOffset)
	}
	bs := int64(h.BlockSize)
	if need := (vsize + bs - 1) / bs; int64(h.MaxEntries) < need {
		c.bad("BAT has %d entries, the disk needs %d", h.MaxEntries, need)
	}
	batBytes := roundUp(4*int64(h.MaxEntries), sectorSize)
	eof := size - 511
	if perr != nil {
		eof = size
	}
	if int64(h.TableOffset)+4*int64(h.MaxEntries) > eof {
		c.bad("BAT (offset %d, %d entries) runs past the end of the file", h.TableOffset, h.MaxEntries)
		return c.r, nil
	}
	raw := make([]byte, 4*int64(h.MaxEntries))
	if err := hostfile.ReadFull(f, raw, int64(h.TableOffset)); err != nil {
		return nil, err
	}
	bat := make([]uint32, h.MaxEntries)
	for i := range bat {
		bat[i] = binary.BigEndian.Uint32(raw[4*i:])
	}
	c.r.TotalBlocks = len(bat)

	// Reuse Open's parsers for the batmap and the locators.
	img := &Image{f: f, path: path, ro: true, foot: ft, hdr: h, fileSize: size, bat: bat, log: discardLogger(),
		blockSize: bs, bmSize: bitmapBytes(h.BlockSize), oldBits: ft.isTap() && ft.CreatorVer == 0x00000001}
	type region struct {
		start, end int64
		what       string
	}
	regions := []region{{0, footerSize, "footer copy"}, {int64(ft.DataOffset), int64(ft.DataOffset) + headerSize, "header"}, {int64(h.TableOffset), int64(h.TableOffset) + batBytes, "BAT"}}
	img.readBatmap(int64(h.TableOffset) + batBytes)
	for _, w := range img.warnings {
		if img.batmap.present {
			c.bad("batmap is invalid: %s", w)
		}
	}
	img.warnings = nil
	if img.batmap.valid {
		regions = append(regions, region{img.batmap.hdrOff, img.batmap.hdrOff + sectorSize, "batmap header"},
			region{img.batmap.off, img.batmap.off + int64(img.batmap.sectors)*sectorSize, "batmap"})
	}
	if ft.Type == typeDiff {
		if h.ParentTime > vhdTime(c.now)+1800 {
			c.warn("parent creation time in the future")
		}
		img.parseLocators()
		if len(img.parentCandidatesList()) == 0 {
			c.bad("differencing disk names no usable parent")
		}
		seen := map[string]bool{}
		for i, l := range img.locators {
			if l.Error != "" {
				c.bad("parent locator %d (%s): %s", i, l.Platform, l.Error)
				continue
			}
			if seen[l.Platform] {
				c.bad("duplicate %s parent locator", l.Platform)
			}
			seen[l.Platform] = true
			regions = append(regions, region{int64(l.Offset), int64(l.Offset) + l.space, "parent locator " + l.Platform})
		}
		if opts.Backing != nil {
			if err := img.openParent(opts.Backing); err != nil {
				c.bad("parent: %v", err)
			} else {
				img.closeParent()
			}
		}
	} else {
		if !image.IsZero(h.ParentName[:]) || h.ParentTime != 0 || h.ParentUUID != [16]byte{} {
			c.bad("differencing header is invalid: non-null parent fields on a %s disk", c.r.Subformat)
		}
		for _, l := range h.Locators {
			if l != (locator{}) {
				c.bad("differencing header is invalid: non-null parent locators")
				break
			}
		}
	}
	sort.Slice(regions, func(a, b int) bool { return regions[a].start < regions[b].start })
	endMeta := int64(0)
	for i, r := range regions {
		endMeta = max(endMeta, r.end)
		if i > 0 && r.start < regions[i-1].end {
			c.bad("%s at %d overlaps %s", r.what, r.start, regions[i-1].what)
		}
	}
	per := img.bmSize + bs
	footerStart := endOff
	if perr != nil {
		footerStart = size
	}
	type span struct {
		start int64
		blk   int
	}
	var spans []span
	for i, e := range bat {
		if e == batUnused {
			continue
		}
		c.r.AllocatedBlocks++
		start := int64(e) * sectorSize
		switch {
		case start < endMeta:
			c.bad("block %d (offset %#x) clobbers headers", i, e)
		case start+per > footerStart:
			c.bad("block %d (offset %#x) clobbers footer", i, e)
		default:
			spans = append(spans, span{start, i})
		}
	}
	sort.Slice(spans, func(a, b int) bool { return spans[a].start < spans[b].start })
	used := endMeta
	for i, s := range spans {
		if i > 0 && s.start < spans[i-1].start+per {
			c.bad("block %d (offset %#x) clobbers block %d (offset %#x)", s.blk, s.start/sectorSize, spans[i-1].blk, spans[i-1].start/sectorSize)
		}
		if s.start > used {
			c.r.LeakedBytes += s.start - used
		}
		used = max(used, s.start+per)
		// Bitmap: bits past the disk's end mean a confused writer.
		bm := make([]byte, img.bmSize)
		if err := hostfile.ReadFull(f, bm, s.start); err != nil {
			c.bad("block %d: bitmap unreadable: %v", s.blk, err)
			continue
		}
		full := true
		for sec := int64(0); sec < bs/sectorSize; sec++ {
			set := img.bitTest(bm, sec)
			if !set {
				full = false
			}
			if set && int64(s.blk)*bs+sec*sectorSize >= vsize {
				c.warn("block %d: bitmap marks sector %d past the end of the disk", s.blk, sec)
				break
			}
		}
		if img.batmap.valid && img.batmap.bits[s.blk>>3]&(0x80>>(s.blk&7)) != 0 && !full {
			c.bad("batmap shows block %d full but its bitmap is not", s.blk)
		}
	}
	if img.batmap.valid {
		for i := range bat {
			if bat[i] == batUnused && img.batmap.bits[i>>3]&(0x80>>(i&7)) != 0 {
				c.bad("batmap shows unallocated block %d full", i)
			}
		}
	}
	if perr == nil && footerStart > used {
		c.r.LeakedBytes += footerStart - used
	}
	if opts.Repair && !c.r.OK() {
		return c.repair(f, path, opts)
	}
	return c.r, nil
}

// repair fixes what a crash or a batmap-unaware writer leaves (a lost
// footer at the end; a block over the batmap), then checks again.
func (c *checker) repair(f hostfile.File, path string, opts CheckOptions) (*CheckResult, error) {
	img, err := openFile(f, path, Options{Backing: opts.Backing, Logger: discardLogger()})
	if err != nil {
		// Not something a repair may touch: report as found.
		return c.r, nil
	}
	var did []string
	if slices.Contains(img.warnings, footerLostWarning) {
		img.allocMu.Lock()
		did = append(did, fmt.Sprintf("footer rewritten at %d from the copy at offset 0", img.nextFree))
		img.allocMu.Unlock()
	}
	more, err := img.repairBatmap()
	did = append(did, more...)
	if err != nil {
		return nil, err
	}
	if err := img.f.Sync(); err != nil {
		return nil, err
	}
	opts.Repair = false
	r, err := checkFile(f, path, opts)
	if r != nil {
		r.Repaired = did
	}
	return r, err
}

func (c *checker) checkFooter(ft *footer, what string) {
	raw := ft.raw[:]
	if ft.Features&featureReserved == 0 {
		c.bad("%s invalid: 'reserved' feature bit clear", what)
	}
	if ft.Features&^(featureReserved|featureTemporary) != 0 {
		c.bad("%s invalid: extra features %#x", what, ft.Features)
	}
	if ft.Version != fileFormatV1 {
		c.bad("%s invalid: file format version %#x", what, ft.Version)
	}
	if ft.Type == typeFixed && ft.DataOffset != ^uint64(0) {
		c.bad("%s invalid: data offset %#x on a fixed disk", what, ft.DataOffset)
	}
	if ft.Timestamp > vhdTime(c.now)+1800 {
		c.warn("%s: creation time in the future", what)
	}
	if ft.isTap() && ft.CreatorVer > creatorTapVersion {
		c.warn("%s: unsupported tap creator version %#x", what, ft.CreatorVer)
	}
	cy, hd, sp := chs(ft.CurrentSize)
	if uint32(ft.Cylinders)<<16|uint32(ft.Heads)<<8|uint32(ft.SPT) > uint32(cy)<<16|uint32(hd)<<8|uint32(sp) {
		c.warn("%s: geometry %d/%d/%d larger than the size implies (%d/%d/%d)", what, ft.Cylinders, ft.Heads, ft.SPT, cy, hd, sp)
	}
	if ft.SavedState > 1 {
		c.bad("%s invalid: 'saved' state %d", what, ft.SavedState)
	}
	if ft.Hidden > 1 {
		c.bad("%s invalid: 'hidden' state %d", what, ft.Hidden)
	}
	if !image.IsZero(raw[86:]) {
		c.warn("%s: reserved bytes are not zero", what)
	}
}
