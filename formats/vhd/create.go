package vhd

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// CreateOptions describe a new VHD.
type CreateOptions struct {
	// Size is the virtual size in bytes, rounded up to 512. For a
	// differencing child 0 means the parent's size (any other value must
	// equal it).
	Size int64
	// Subformat is "dynamic" (default) or "fixed".
	Subformat string
	// Backing names the parent VHD, making a differencing child. A
	// relative name is taken relative to the child's directory and is
	// stored as given (plus its absolute form) in the parent locators.
	Backing string
	// BackingFormat must be "" or "vhd": a VHD's parent is a VHD.
	BackingFormat string
	// BlockSize of a dynamic or differencing disk (default 2 MiB); a
	// power of two from 512 B to 256 MiB.
	BlockSize int64
	// Now stamps the footer (nil: time.Now). For reproducible tests.
	Now func() time.Time
}

// MaxSize is the largest disk Create makes (2040 GiB).
const MaxSize = maxCreateSectors * sectorSize

// Create makes a new VHD at path. It never overwrites (O_EXCL) and the
// file and its directory entry are durable when it returns. On failure
// the partial file is removed.
func Create(path string, opts CreateOptions) (err error) {
	plan, err := planCreate(path, opts)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("vhd: create %s: %w", path, err)
	}
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("vhd: create %s: %w", path, cerr)
		}
		if err != nil {
			os.Remove(path)
		}
	}()
	if err := plan.write(hostfile.OSFile{File: f}); err != nil {
		return fmt.Errorf("vhd: create %s: %w", path, err)
	}
	// The new name should survive a crash too; a directory that cannot
	// be synced does not undo the create.
	_ = hostfile.OSFS{}.SyncDir(filepath.Dir(path))
	return nil
}

// createPlan is every byte Create writes, computed before the file exists.
type createPlan struct {
	foot    footer
	hdr     *header
	size    int64
	pieces  []piece // metadata regions, in file order
	fileEnd int64   // where the footer goes
}

type piece struct {
	off  int64
	data []byte
}

// planCreate computes the new file in steps: the parent (if any), the
// footer, then for a dynamic or differencing disk the BAT, the batmap and
// the parent locators, laid out one after another behind the header.
func planCreate(path string, opts CreateOptions) (*createPlan, error) {
	sub := strings.ToLower(opts.Subformat)
	if sub == "" {
		sub = "dynamic"
	}
	if sub != "dynamic" && sub != "fixed" {
		return nil, fmt.Errorf("vhd: subformat %q: %w (want dynamic or fixed)", opts.Subformat, image.ErrUnsupported)
	}
	now := time.Now
	if opts.Now != nil {
		now = opts.Now
	}
	var par *parentInfo
	if opts.Backing != "" {
		var err error
		if par, err = openParent(path, sub, opts); err != nil {
			return nil, err
		}
		ps, _ := par.foot.virtualSize()
		if opts.Size != 0 && roundUp(opts.Size, sectorSize) != ps {
			return nil, fmt.Errorf("vhd: size %d differs from the parent's %d; a differencing disk has its parent's size", opts.Size, ps)
		}
		opts.Size = ps
	}
	size := roundUp(opts.Size, sectorSize)
	if opts.Size <= 0 {
		return nil, fmt.Errorf("vhd: size %d: must be positive", opts.Size)
	}
	if size > MaxSize {
		return nil, fmt.Errorf("vhd: size %d bytes exceeds the VHD limit of 2040 GiB (%d bytes): %w; use qcow2 for larger disks", opts.Size, int64(MaxSize), image.ErrUnsupported)
	}
	p := &createPlan{size: size}
	if err := p.foot.fillNew(size, now()); err != nil {
		return nil, err
	}
	if sub == "fixed" {
		p.foot.Type = typeFixed
		p.foot.DataOffset = ^uint64(0)
		p.fileEnd = size
		return p, nil
	}
	if err := p.planSparse(path, opts.BlockSize, par); err != nil {
		return nil, err
	}
	return p, nil
}

// parentInfo is what a differencing child records of its parent.
type parentInfo struct {
	foot     *footer
	abs, rel string // rel as the caller named it
	mtime    time.Time
}

// openParent reads the parent's footer and modification time; the name is
// taken relative to the child's directory.
func openParent(path, sub string, opts CreateOptions) (*parentInfo, error) {
	if sub == "fixed" {
		return nil, fmt.Errorf("vhd: a fixed disk cannot have a parent: %w", image.ErrUnsupported)
	}
	if opts.BackingFormat != "" && opts.BackingFormat != "vhd" {
		return nil, fmt.Errorf("vhd: parent format %q: %w (a VHD's parent must be a VHD)", opts.BackingFormat, image.ErrUnsupported)
	}
	par := &parentInfo{rel: opts.Backing}
	name := opts.Backing
	if !filepath.IsAbs(name) {
		name = filepath.Join(filepath.Dir(path), name)
	}
	abs, err := filepath.Abs(name)
	if err != nil {
		return nil, fmt.Errorf("vhd: parent %s: %w", opts.Backing, err)
	}
	par.abs = abs
	pf, err := os.Open(abs)
	if err != nil {
		return nil, fmt.Errorf("vhd: parent: %w", err)
	}
	st, err := pf.Stat()
	if err == nil {
		par.mtime = st.ModTime()
		par.foot, _, err = readFooter(hostfile.OSFile{File: pf}, st.Size())
	}
	pf.Close()
	if err != nil {
		return nil, fmt.Errorf("vhd: parent %s: %w", abs, err)
	}
	return par, nil
}

// fillNew sets the fields every new footer has: this creator, the size and
// its CHS geometry, a random (version 4) UUID.
func (ft *footer) fillNew(size int64, now time.Time) error {
	ft.Features = featureReserved
	ft.Version = fileFormatV1
	ft.Timestamp = vhdTime(now)
	ft.CreatorApp = creatorTap
	ft.CreatorVer = creatorTapVersion
	ft.CreatorOS = 0
	ft.OrigSize = uint64(size)
	ft.CurrentSize = uint64(size)
	ft.Cylinders, ft.Heads, ft.SPT = chs(uint64(size))
	if _, err := rand.Read(ft.UUID[:]); err != nil {
		return fmt.Errorf("vhd: uuid: %w", err)
	}
	ft.UUID[6] = ft.UUID[6]&0x0f | 0x40 // version 4
	ft.UUID[8] = ft.UUID[8]&0x3f | 0x80
	return nil
}

// planSparse lays out a dynamic or differencing disk's header, BAT,
// batmap and (for a child) parent locators.
func (p *createPlan) planSparse(path string, bs int64, par *parentInfo) error {
	p.foot.Type = typeDynamic
	if par != nil {
		p.foot.Type = typeDiff
	}
	p.foot.DataOffset = footerSize
	if bs == 0 {
		bs = defaultBlockSize
	}
	if bs < sectorSize || bs > maxBlockSize || bs&(bs-1) != 0 {
		return fmt.Errorf("vhd: block size %d: must be a power of two from 512 to %d", bs, maxBlockSize)
	}
	entries := (p.size + bs - 1) / bs
	if entries > maxBATEntries {
		return fmt.Errorf("vhd: %d blocks of %d bytes exceed the BAT cap %d; use larger blocks", entries, bs, maxBATEntries)
	}
	p.hdr = &header{DataOffset: ^uint64(0), TableOffset: footerSize + headerSize, Version: headerVersion, MaxEntries: uint32(entries), BlockSize: uint32(bs)}
	off := int64(p.hdr.TableOffset)
	off = p.addBAT(entries, off)
	off = p.addBatmap(entries, off)
	if par != nil {
		var err error
		if off, err = p.addParent(path, par, off); err != nil {
			return err
		}
	}
	p.fileEnd = off
	return nil
}

// addBAT places a BAT with every entry unallocated at off and returns
// where the next piece goes.
func (p *createPlan) addBAT(entries, off int64) int64 {
	bat := make([]byte, roundUp(4*entries, sectorSize))
	for i := range bat {
		bat[i] = 0xFF
	}
	p.pieces = append(p.pieces, piece{off, bat})
	return off + int64(len(bat))
}

// addBatmap places the batmap that creator tap 1.3 implies: all clear ("no
// block is known to be full"), which is always true enough for libvhd.
func (p *createPlan) addBatmap(entries, off int64) int64 {
	mapSecs := (entries + 8*sectorSize - 1) / (8 * sectorSize)
	bits := make([]byte, mapSecs*sectorSize)
	bmHdr := make([]byte, sectorSize)
	copy(bmHdr, cookieBatmap)
	binary.BigEndian.PutUint64(bmHdr[8:], uint64(off+sectorSize))
	binary.BigEndian.PutUint32(bmHdr[16:], uint32(mapSecs))
	binary.BigEndian.PutUint32(bmHdr[20:], batmapVersion)
	binary.BigEndian.PutUint32(bmHdr[24:], batmapChecksum(bits, batmapVersion))
	p.pieces = append(p.pieces, piece{off, bmHdr}, piece{off + sectorSize, bits})
	return off + sectorSize + int64(len(bits))
}

// addParent records the parent in the header and writes three locators
// (MacX absolute URL, W2ku absolute, W2ru relative) from off on.
func (p *createPlan) addParent(path string, par *parentInfo, off int64) (int64, error) {
	h := p.hdr
	h.ParentUUID = par.foot.UUID
	h.ParentTime = vhdTime(par.mtime)
	name := encodeUTF16(filepath.ToSlash(par.rel), true)
	if len(name) > len(h.ParentName) {
		return 0, fmt.Errorf("vhd: parent name %q is longer than 256 UTF-16 units", par.rel)
	}
	copy(h.ParentName[:], name)
	locs := locatorData(path, par)
	for i, l := range locs {
		space := roundUp(int64(len(l.data)), sectorSize)
		h.Locators[i] = locator{Code: l.code, DataSpace: uint32(space / sectorSize), DataLength: uint32(len(l.data)), DataOffset: uint64(off)}
		buf := make([]byte, space)
		copy(buf, l.data)
		p.pieces = append(p.pieces, piece{off, buf})
		off += space
	}
	return off, nil
}

// locatorData is what each platform's locator holds of the parent's name,
// in the order a new child stores them: MacX absolute URL, W2ku absolute,
// W2ru relative to the child's directory.
func locatorData(path string, par *parentInfo) []struct {
	code uint32
	data []byte
} {
	rel := par.rel
	if filepath.IsAbs(rel) {
		if r, err := filepath.Rel(filepath.Dir(mustAbs(path)), par.abs); err == nil {
			rel = r
		}
	}
	rel = filepath.ToSlash(filepath.Clean(rel))
	return []struct {
		code uint32
		data []byte
	}{
		{platMacX, []byte("file://" + par.abs)},
		{platW2ku, encodeUTF16(strings.ReplaceAll(par.abs, "/", `\`), false)},
		{platW2ru, encodeUTF16(`.\`+strings.ReplaceAll(strings.TrimPrefix(rel, "./"), "/", `\`), false)},
	}
}

func mustAbs(p string) string {
	a, err := filepath.Abs(p)
	if err != nil {
		return p
	}
	return a
}

func (p *createPlan) write(f hostfile.File) error {
	fb := p.foot.encode()
	if p.hdr == nil {
		// Fixed: a sparse data area, then the footer.
		if err := f.Truncate(p.fileEnd); err != nil {
			return err
		}
		if err := hostfile.WriteFull(f, fb, p.fileEnd); err != nil {
			return err
		}
		return f.Sync()
	}
	if err := hostfile.WriteFull(f, fb, 0); err != nil {
		return err
	}
	if err := hostfile.WriteFull(f, p.hdr.encode(), footerSize); err != nil {
		return err
	}
	for _, pc := range p.pieces {
		if err := hostfile.WriteFull(f, pc.data, pc.off); err != nil {
			return err
		}
	}
	if err := hostfile.WriteFull(f, fb, p.fileEnd); err != nil {
		return err
	}
	return f.Sync()
}

// Detect reports whether header (the first bytes of a file, 512 are
// enough) starts with a VHD footer copy: dynamic and differencing disks.
// A fixed disk has its only footer at the end; see DetectTail.
func Detect(header []byte) bool {
	if len(header) < footerSize {
		return false
	}
	f, err := parseFooter(header[:footerSize], 0)
	return err == nil && f.Type != typeFixed
}

// DetectTail reports whether tail (the last 512 bytes of a file) is a
// valid VHD footer. Probers should try it after the formats with a magic
// at offset 0 and before raw.
func DetectTail(tail []byte) bool {
	if len(tail) < footerSize {
		return false
	}
	_, err := parseFooter(tail[len(tail)-footerSize:], 0)
	return err == nil
}
