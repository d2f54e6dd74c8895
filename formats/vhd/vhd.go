package vhd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sort"
	"sync"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// Options tune Open.
type Options struct {
	// ReadOnly opens the file O_RDONLY; writes fail with image.ErrReadOnly.
	ReadOnly bool
	// Backing opens the parent of a differencing image. nil makes a
	// differencing image fail to open with a clear error.
	Backing image.OpenFunc
	// SkipParent opens a differencing disk without its parent (for info
	// and map of this layer alone, read-only): reads that need the
	// parent fail, and Map reports its ranges as holes at depth 1.
	SkipParent bool
	// BitmapCacheBlocks bounds how many per-block sector bitmaps stay in
	// memory (default 4096, i.e. 2 MiB for 2 MiB blocks).
	BitmapCacheBlocks int
	// Logger receives warnings (nil: slog.Default()).
	Logger *slog.Logger
}

// Image is an open VHD. It implements image.Image and is safe for
// concurrent use.
type Image struct {
	f        hostfile.File
	path     string
	ro       bool
	log      *slog.Logger
	foot     *footer
	hdr      *header // nil for fixed disks
	size     int64   // virtual size
	sizeFrom string
	fileSize int64 // at open
	footOff  int64 // where the footer in use sits, for errors

	blockSize int64
	bmSize    int64
	oldBits   bool // tapdisk 0.1 images: little-endian u32 bit order
	batmap    batmapState

	parent                   image.Image
	parentName, parentFormat string
	parentCandidates         []string
	noParent                 bool // SkipParent: a differencing disk opened alone
	locators                 []Locator
	warnings                 []string

	// life keeps Close from racing calls in flight.
	life   sync.RWMutex
	closed bool

	// mu guards bat and bmCache. Bitmaps in bmCache are never modified
	// in place (copy on write), so a reader may use one after unlocking.
	mu       sync.RWMutex
	bat      []uint32
	bmCache  map[uint32][]byte
	cacheCap int

	// allocMu serialises every metadata writer: block allocation,
	// bitmap bit changes, BAT and footer writes. It is held across the
	// I/O of those (rare) writes so that two writers never allocate the
	// same block nor race on one bitmap sector; plain data writes to
	// sectors already allocated never take it.
	allocMu  sync.Mutex
	nextFree int64 // where the footer sits and the next block goes; allocMu
}

type batmapState struct {
	present bool  // the creator implies or the file holds one
	valid   bool  // header and checksum good, placed clear of blocks
	hdrOff  int64 // header offset
	off     int64 // map offset
	sectors uint32
	version uint32
	bits    []byte // guarded by allocMu once open
}

var _ image.Image = (*Image)(nil)

// Open opens the VHD at path.
func Open(path string, opts Options) (*Image, error) {
	return hostfile.OpenWith(path, opts.ReadOnly, "vhd: open "+path, func(f *os.File) (*Image, error) {
		return openFile(hostfile.OSFile{File: f}, path, opts)
	})
}

// readFooter finds the footer: at the end (512 bytes, or 511 for old
// short footers), else the copy at offset 0 for dynamic disks. It says
// whether the one at the end was good.
func readFooter(f hostfile.File, size int64) (ft *footer, atEnd bool, err error) {
	if size < footerSize {
		return nil, false, fmtErr(image.ErrWrongFormat, -1, "", "file of %d bytes is too small for a VHD", size)
	}
	buf := make([]byte, footerSize)
	endOff := size - footerSize
	if size%sectorSize == 511 {
		endOff = size - 511
	}
	var endErr error
	n, rerr := f.ReadAt(buf, endOff)
	if n < 511 {
		return nil, false, fmt.Errorf("vhd: read footer: %w", rerr)
	}
	if n == 511 {
		buf[511] = 0
	}
	ft, endErr = parseFooter(buf, endOff)
	if endErr == nil {
		return ft, true, nil
	}
	if err := hostfile.ReadFull(f, buf, 0); err != nil {
		return nil, false, fmt.Errorf("vhd: read footer copy: %w", err)
	}
	copyFt, copyErr := parseFooter(buf, 0)
	if copyErr == nil && copyFt.Type != typeFixed {
		return copyFt, false, nil
	}
	// Report the footer at the end: that is where a fixed disk keeps
	// its only one, and where a reader first looks.
	if errors.Is(endErr, image.ErrWrongFormat) && copyErr != nil && !errors.Is(copyErr, image.ErrWrongFormat) {
		return nil, false, copyErr
	}
	return nil, false, endErr
}

func openFile(f hostfile.File, path string, opts Options) (*Image, error) {
	size, err := f.Size()
	if err != nil {
		return nil, fmt.Errorf("vhd: stat %s: %w", path, err)
	}
	img := &Image{f: f, path: path, ro: opts.ReadOnly, log: opts.Logger, fileSize: size}
	if img.log == nil {
		img.log = slog.Default()
	}
	img.cacheCap = opts.BitmapCacheBlocks
	if img.cacheCap <= 0 {
		img.cacheCap = 4096
	}
	ft, atEnd, err := readFooter(f, size)
	if err != nil {
		return nil, err
	}
	img.foot = ft
	if atEnd {
		img.footOff = (size - 511) / sectorSize * sectorSize
	}
	footOff := img.footOff
	img.size, img.sizeFrom = ft.virtualSize()
	if ft.Features&featureReserved == 0 {
		img.warn("footer features %#x lack the reserved bit 2", ft.Features)
	}
	if ft.Version != fileFormatV1 {
		return nil, fmtErr(image.ErrUnsupported, footOff+12, "file_format_version", "version %#08x (want 0x00010000)", ft.Version)
	}
	if img.size < 0 || img.size > 1<<44 {
		return nil, fmtErr(image.ErrCorrupt, footOff+48, "current_size", "size %d is out of range", img.size)
	}
	if ft.Type == typeFixed {
		dataEnd := size - footerSize
		if size%sectorSize == 511 {
			dataEnd = size - 511
		}
		if img.size > dataEnd {
			return nil, fmtErr(image.ErrCorrupt, footOff+48, "current_size", "fixed disk of %d bytes in a file of %d bytes", img.size, size)
		}
		img.nextFree = size - footerSize
		return img, nil
	}
	if !atEnd {
		img.warn(footerLostWarning)
	}
	if err := img.openDynamic(atEnd); err != nil {
		return nil, err
	}
	if ft.Type == typeDiff {
		if err := img.openDiff(opts); err != nil {
			return nil, err
		}
	}
	if err := img.mendFooters(atEnd); err != nil {
		img.closeParent()
		return nil, err
	}
	return img, nil
}

// openDiff finds a differencing disk's parent, or only its name when
// opts.SkipParent (read-only: the chain is not followed).
func (img *Image) openDiff(opts Options) error {
	if !opts.SkipParent {
		return img.openParent(opts.Backing)
	}
	if !opts.ReadOnly {
		return fmt.Errorf("vhd: SkipParent needs ReadOnly: %w", image.ErrReadOnly)
	}
	img.noParent = true
	img.parentCandidates = img.parentCandidatesList()
	if len(img.parentCandidates) > 0 {
		img.parentName, img.parentFormat = img.parentCandidates[0], "vhd"
	}
	return nil
}

// mendFooters, on a writable open, makes the two footer copies agree
// again: the copy at offset 0 from the one at the end, or, the end's
// being lost, a footer put back at the end so that readers which look
// only there (libvhd strict mode, vhd-util) accept the file again.
// Appending never overwrites anything a BAT entry may reference.
func (img *Image) mendFooters(atEnd bool) error {
	if img.ro {
		return nil
	}
	if atEnd {
		return img.healFooterCopy()
	}
	if err := img.writeFooterLocked(img.nextFree); err != nil {
		return err
	}
	return img.f.Sync()
}

const footerLostWarning = "footer at the end of the file is missing or bad; using the copy at offset 0"

func (img *Image) warn(format string, a ...any) {
	msg := fmt.Sprintf(format, a...)
	img.warnings = append(img.warnings, msg)
	img.log.Warn("vhd: "+msg, "path", img.path)
}

func (img *Image) openDynamic(footerAtEnd bool) error {
	ft := img.foot
	size := img.fileSize
	if ft.DataOffset < footerSize || ft.DataOffset%sectorSize != 0 || ft.DataOffset > uint64(size) || uint64(size)-ft.DataOffset < headerSize {
		return fmtErr(image.ErrCorrupt, img.footOff+16, "data_offset", "dynamic header offset %d is outside the file (%d bytes) or unaligned", int64(ft.DataOffset), size)
	}
	hb := make([]byte, headerSize)
	if err := hostfile.ReadFull(img.f, hb, int64(ft.DataOffset)); err != nil {
		return fmt.Errorf("vhd: read dynamic header: %w", err)
	}
	h, err := parseHeader(hb, int64(ft.DataOffset))
	if err != nil {
		return err
	}
	img.hdr = h
	img.blockSize = int64(h.BlockSize)
	img.bmSize = bitmapBytes(h.BlockSize)
	img.oldBits = ft.isTap() && ft.CreatorVer == 0x00000001
	need := (img.size + img.blockSize - 1) / img.blockSize
	if int64(h.MaxEntries) < need {
		return fmtErr(image.ErrCorrupt, int64(ft.DataOffset)+28, "max_table_entries", "%d BAT entries of %d bytes cannot hold a %d-byte disk", h.MaxEntries, h.BlockSize, img.size)
	}
	batBytes := roundUp(4*int64(h.MaxEntries), sectorSize)
	if h.TableOffset > uint64(size) || size-int64(h.TableOffset) < 4*int64(h.MaxEntries) {
		return fmtErr(image.ErrCorrupt, int64(ft.DataOffset)+16, "table_offset", "BAT of %d entries at %d runs past the end of the file (%d bytes)", h.MaxEntries, h.TableOffset, size)
	}
	raw := make([]byte, 4*int64(h.MaxEntries))
	if err := hostfile.ReadFull(img.f, raw, int64(h.TableOffset)); err != nil {
		return fmt.Errorf("vhd: read BAT: %w", err)
	}
	img.bat = make([]uint32, h.MaxEntries)
	for i := range img.bat {
		img.bat[i] = binary.BigEndian.Uint32(raw[4*i:])
	}
	img.bmCache = make(map[uint32][]byte)

	// Metadata regions, to tell blocks that clobber them.
	endMeta := int64(ft.DataOffset) + headerSize
	endMeta = max(endMeta, int64(h.TableOffset)+batBytes)
	img.readBatmap(int64(h.TableOffset) + batBytes)
	if img.batmap.valid {
		endMeta = max(endMeta, img.batmap.off+int64(img.batmap.sectors)*sectorSize)
	}
	if ft.Type == typeDiff {
		img.parseLocators()
		for _, l := range img.locators {
			if l.inFile {
				endMeta = max(endMeta, int64(l.Offset)+l.space)
			}
		}
	}
	if err := img.checkMetaOverlap(); err != nil {
		return err
	}
	maxEnd, err := img.checkBlocks(endMeta, footerAtEnd)
	if err != nil {
		return err
	}
	footerPos := size - footerSize
	if size%sectorSize == 511 {
		footerPos = size - 511
	}
	if !footerAtEnd {
		footerPos = roundUp(size, sectorSize)
	}
	img.nextFree = max(roundUp(footerPos, sectorSize), maxEnd)
	return nil
}

// checkBlocks requires every allocated block to lie inside the file,
// clear of the metadata (which ends at endMeta) and of every other block:
// a writer trusting such a BAT would scribble over metadata or another
// block's data. It returns where the last block ends, and drops a batmap
// that a block overlaps.
func (img *Image) checkBlocks(endMeta int64, footerAtEnd bool) (int64, error) {
	h, size := img.hdr, img.fileSize
	per := img.bmSize + img.blockSize
	type span struct {
		start int64
		blk   int
	}
	var spans []span
	maxEnd := endMeta
	limit := size - 511 // a footer follows the last block
	if !footerAtEnd {
		limit = size
	}
	for i, e := range img.bat {
		if e == batUnused {
			continue
		}
		start := int64(e) * sectorSize
		if start < endMeta {
			return 0, fmtErr(image.ErrCorrupt, int64(h.TableOffset)+4*int64(i), "bat", "block %d at %d overlaps the headers (which end at %d)", i, start, endMeta)
		}
		if start+per > limit {
			return 0, fmtErr(image.ErrCorrupt, int64(h.TableOffset)+4*int64(i), "bat", "block %d at %d (%d bytes) runs past the end of the file (%d bytes)", i, start, per, size)
		}
		spans = append(spans, span{start, i})
		maxEnd = max(maxEnd, start+per)
	}
	sort.Slice(spans, func(a, b int) bool { return spans[a].start < spans[b].start })
	for i := 1; i < len(spans); i++ {
		if spans[i].start < spans[i-1].start+per {
			return 0, fmtErr(image.ErrCorrupt, int64(h.TableOffset)+4*int64(spans[i].blk), "bat", "block %d at %d overlaps block %d at %d", spans[i].blk, spans[i].start, spans[i-1].blk, spans[i-1].start)
		}
	}
	if img.batmap.valid {
		for _, s := range spans {
			if s.start < img.batmap.off+int64(img.batmap.sectors)*sectorSize && s.start+per > img.batmap.hdrOff {
				// qemu allocates right after the BAT and so overwrites
				// libvhd's batmap; its bits can no longer be trusted.
				img.batmap.valid = false
				img.warn("block %d overlaps the batmap; ignoring the batmap", s.blk)
				break
			}
		}
	}
	return maxEnd, nil
}

func (img *Image) readBatmap(hdrOff int64) {
	ft := img.foot
	bm := &img.batmap
	bm.hdrOff = hdrOff
	// libvhd's rule: tap images from 1.2 on carry one; 1.1 may.
	if !ft.isTap() || ft.CreatorVer <= 0x00000001 {
		return
	}
	implied := ft.CreatorVer >= 0x00010002
	b := make([]byte, sectorSize)
	if err := hostfile.ReadFull(img.f, b, hdrOff); err != nil || string(b[:8]) != string(cookieBatmap) {
		if implied {
			bm.present = true
			img.warn("batmap header missing at %d (creator tap %#x implies one)", hdrOff, ft.CreatorVer)
		}
		return
	}
	bm.present = true
	be := binary.BigEndian
	bm.off = int64(be.Uint64(b[8:]))
	bm.sectors = be.Uint32(b[16:])
	bm.version = be.Uint32(b[20:])
	sum := be.Uint32(b[24:])
	need := (int64(len(img.bat)) + 8*sectorSize - 1) / (8 * sectorSize)
	if bm.version > batmapVersion || bm.off%sectorSize != 0 || bm.off <= hdrOff || bm.sectors == 0 ||
		int64(bm.sectors) < need || int64(bm.sectors) > maxBATEntries/(8*sectorSize)+1 || bm.off > img.fileSize || img.fileSize-bm.off < int64(bm.sectors)*sectorSize {
		img.warn("batmap header at %d is invalid (offset %d, %d sectors, version %#x)", hdrOff, bm.off, bm.sectors, bm.version)
		return
	}
	bits := make([]byte, int64(bm.sectors)*sectorSize)
	if err := hostfile.ReadFull(img.f, bits, bm.off); err != nil {
		img.warn("batmap unreadable: %v", err)
		return
	}
	if batmapChecksum(bits, bm.version) != sum {
		img.warn("batmap checksum mismatch")
		return
	}
	bm.bits = bits
	bm.valid = true
}

func batmapChecksum(bits []byte, version uint32) uint32 {
	var s uint32
	for _, c := range bits {
		if version == 0x00010001 {
			s += uint32(int32(int8(c))) // version 1.1 summed signed chars
		} else {
			s += uint32(c)
		}
	}
	return ^s
}

func (img *Image) batmapHeader() []byte {
	b := make([]byte, sectorSize)
	copy(b, cookieBatmap)
	be := binary.BigEndian
	be.PutUint64(b[8:], uint64(img.batmap.off))
	be.PutUint32(b[16:], img.batmap.sectors)
	be.PutUint32(b[20:], img.batmap.version)
	be.PutUint32(b[24:], batmapChecksum(img.batmap.bits, img.batmap.version))
	return b
}

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func fmtUUID(u [16]byte) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// BackingFile returns the parent's name as stored (the first locator
// that decodes, relative preferred) and its format ("vhd"), or "" for a
// disk that is not differencing.
func (img *Image) BackingFile() (name, format string) {
	return img.parentName, img.parentFormat
}

// Size is the virtual size in bytes.
func (img *Image) Size() int64 { return img.size }

func (img *Image) enter() error {
	img.life.RLock()
	if img.closed {
		img.life.RUnlock()
		return image.ErrClosed
	}
	return nil
}

func (img *Image) leave() { img.life.RUnlock() }

// Close flushes (when writable) and releases the file and the parent.
func (img *Image) Close() error {
	img.life.Lock()
	defer img.life.Unlock()
	if img.closed {
		return image.ErrClosed
	}
	img.closed = true
	var errs []error
	if !img.ro {
		errs = append(errs, img.f.Sync())
	}
	errs = append(errs, img.f.Close())
	if img.parent != nil {
		errs = append(errs, img.parent.Close())
	}
	return errors.Join(errs...)
}

// Flush makes every completed write durable. Metadata is written (in
// order) by the writes themselves, so one fdatasync covers both.
func (img *Image) Flush() error {
	if err := img.enter(); err != nil {
		return err
	}
	defer img.leave()
	if img.ro {
		return nil
	}
	return img.f.Sync()
}
