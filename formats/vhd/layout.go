package vhd

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"time"
	"unicode/utf16"

	"github.com/blktap-go/blktap/formats/image"
)

const (
	sectorSize = 512
	footerSize = 512
	headerSize = 1024

	// Disk types stored in the footer.
	typeFixed   = 2
	typeDynamic = 3
	typeDiff    = 4

	featureReserved  = 2 // must always be set
	featureTemporary = 1
	fileFormatV1     = 0x00010000
	headerVersion    = 0x00010000

	batUnused = 0xFFFFFFFF

	defaultBlockSize = 2 << 20
	// maxCreateSectors is the largest disk Create makes: 0xff000000
	// sectors (2040 GiB), what current qemu and XenServer accept.
	maxCreateSectors = 0xff000000
	// maxBATEntries caps the BAT a header may claim (64 MiB of table),
	// far above any image the format can address with 2 MiB blocks.
	maxBATEntries = 1 << 24
	// maxBlockSize caps the block size a header may claim; a bitmap
	// for it is 64 KiB.
	maxBlockSize = 256 << 20

	// Parent locator platform codes.
	platNone = 0
	platWi2r = 0x57693272 // "Wi2r", deprecated
	platWi2k = 0x5769326B // "Wi2k", deprecated
	platW2ru = 0x57327275 // "W2ru": relative path, UTF-16LE
	platW2ku = 0x57326B75 // "W2ku": absolute path, UTF-16LE
	platMac  = 0x4D616320 // "Mac ": alias blob, unsupported
	platMacX = 0x4D616358 // "MacX": file:// URL, UTF-8

	// Batmap ("tdbatmap"): libvhd's map of fully allocated blocks.
	batmapVersion = 0x00010002
)

var (
	cookieFooter = []byte("conectix")
	cookieHeader = []byte("cxsparse")
	cookieBatmap = []byte("tdbatmap")
	// vhdEpoch is the zero of VHD timestamps.
	vhdEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)
)

// creatorTap is the creator app we write: qemu then takes the disk size
// from current_size (not from the CHS geometry), and libvhd/tapdisk treat
// the image as theirs. We claim version 1.3 as libvhd does, and so write
// the batmap that version implies.
var creatorTap = [4]byte{'t', 'a', 'p', 0}

const creatorTapVersion = 0x00010003

// footer is the 512-byte hard disk footer (and its copy at offset 0).
type footer struct {
	Features    uint32
	Version     uint32
	DataOffset  uint64
	Timestamp   uint32
	CreatorApp  [4]byte
	CreatorVer  uint32
	CreatorOS   uint32
	OrigSize    uint64
	CurrentSize uint64
	Cylinders   uint16
	Heads       uint8
	SPT         uint8
	Type        uint32
	Checksum    uint32
	UUID        [16]byte
	SavedState  uint8
	Hidden      uint8
	raw         [footerSize]byte
}

func checksum(b []byte, skipAt int) uint32 {
	var s uint32
	for i, c := range b {
		if i >= skipAt && i < skipAt+4 {
			continue
		}
		s += uint32(c)
	}
	return ^s
}

func fmtErr(class error, off int64, field, format string, a ...any) error {
	return &image.FormatError{Format: "vhd", Offset: off, Field: field, Err: class, Detail: fmt.Sprintf(format, a...)}
}

// parseFooter decodes b (512 bytes; a 511-byte short footer is padded by
// the caller). off is where it was read, for errors.
func parseFooter(b []byte, off int64) (*footer, error) {
	if len(b) < footerSize {
		return nil, fmtErr(image.ErrCorrupt, off, "footer", "short footer: %d bytes", len(b))
	}
	if !bytes.Equal(b[:8], cookieFooter) {
		return nil, fmtErr(image.ErrWrongFormat, off, "cookie", "no \"conectix\" cookie")
	}
	f := &footer{}
	copy(f.raw[:], b)
	be := binary.BigEndian
	f.Features = be.Uint32(b[8:])
	f.Version = be.Uint32(b[12:])
	f.DataOffset = be.Uint64(b[16:])
	f.Timestamp = be.Uint32(b[24:])
	copy(f.CreatorApp[:], b[28:32])
	f.CreatorVer = be.Uint32(b[32:])
	f.CreatorOS = be.Uint32(b[36:])
	f.OrigSize = be.Uint64(b[40:])
	f.CurrentSize = be.Uint64(b[48:])
	f.Cylinders = be.Uint16(b[56:])
	f.Heads = b[58]
	f.SPT = b[59]
	f.Type = be.Uint32(b[60:])
	f.Checksum = be.Uint32(b[64:])
	copy(f.UUID[:], b[68:84])
	f.SavedState = b[84]
	f.Hidden = b[85]
	if sum := checksum(b[:footerSize], 64); sum != f.Checksum {
		// Early tapdisk marked images hidden without re-summing.
		hiddenOK := false
		if f.Hidden != 0 && f.isTap() && (f.CreatorVer == 0x00000001 || f.CreatorVer == 0x00010001) {
			var c [footerSize]byte
			copy(c[:], b)
			c[85] = 0
			hiddenOK = checksum(c[:], 64) == f.Checksum
		}
		if !hiddenOK {
			return nil, fmtErr(image.ErrCorrupt, off+64, "footer checksum", "stored %#08x, computed %#08x", f.Checksum, sum)
		}
	}
	switch f.Type {
	case typeFixed, typeDynamic, typeDiff:
	default:
		return nil, fmtErr(image.ErrUnsupported, off+60, "disk_type", "disk type %d (only 2 fixed, 3 dynamic, 4 differencing exist)", f.Type)
	}
	return f, nil
}

func (f *footer) isTap() bool { return bytes.Equal(f.CreatorApp[:3], []byte("tap")) }

func (f *footer) encode() []byte {
	b := make([]byte, footerSize)
	copy(b, f.raw[:]) // keeps reserved bytes as read
	be := binary.BigEndian
	copy(b, cookieFooter)
	be.PutUint32(b[8:], f.Features)
	be.PutUint32(b[12:], f.Version)
	be.PutUint64(b[16:], f.DataOffset)
	be.PutUint32(b[24:], f.Timestamp)
	copy(b[28:32], f.CreatorApp[:])
	be.PutUint32(b[32:], f.CreatorVer)
	be.PutUint32(b[36:], f.CreatorOS)
	be.PutUint64(b[40:], f.OrigSize)
	be.PutUint64(b[48:], f.CurrentSize)
	be.PutUint16(b[56:], f.Cylinders)
	b[58] = f.Heads
	b[59] = f.SPT
	be.PutUint32(b[60:], f.Type)
	copy(b[68:84], f.UUID[:])
	b[84] = f.SavedState
	b[85] = f.Hidden
	f.Checksum = checksum(b, 64)
	be.PutUint32(b[64:], f.Checksum)
	copy(f.raw[:], b)
	return b
}

// chs computes the geometry the VHD specification assigns to a size.
func chs(size uint64) (cyl uint16, heads, spt uint8) {
	secs := (size + sectorSize - 1) / sectorSize
	if secs > 65535*16*255 {
		secs = 65535 * 16 * 255
	}
	var h, s, cth uint64
	if secs >= 65535*16*63 {
		s, h = 255, 16
		cth = secs / s
	} else {
		s = 17
		cth = secs / s
		h = (cth + 1023) / 1024
		if h < 4 {
			h = 4
		}
		if cth >= h*1024 || h > 16 {
			s, h = 31, 16
			cth = secs / s
		}
		if cth >= h*1024 {
			s, h = 63, 16
			cth = secs / s
		}
	}
	return uint16(cth / h), uint8(h), uint8(s)
}

// virtualSize follows qemu's rule (docs/WIRE.md, section "VHD", the size trap), so that qemu-img and we
// agree on every image: creators known to mean current_size, and disks
// at the maximum geometry, use current_size; the rest use the geometry.
func (f *footer) virtualSize() (int64, string) {
	switch string(f.CreatorApp[:]) {
	case "win ", "qem2", "d2v ", "CTXS", "tap\x00":
		return int64(f.CurrentSize), "current_size"
	}
	if f.Cylinders == 65535 && f.Heads == 16 && f.SPT == 255 {
		return int64(f.CurrentSize), "current_size"
	}
	return int64(f.Cylinders) * int64(f.Heads) * int64(f.SPT) * sectorSize, "geometry"
}

// locator is one parent locator entry of the dynamic header.
type locator struct {
	Code       uint32
	DataSpace  uint32
	DataLength uint32
	DataOffset uint64
}

// header is the 1024-byte dynamic disk header.
type header struct {
	DataOffset   uint64
	TableOffset  uint64
	Version      uint32
	MaxEntries   uint32
	BlockSize    uint32
	Checksum     uint32
	ParentUUID   [16]byte
	ParentTime   uint32
	ParentName   [512]byte
	Locators     [8]locator
	reservedZero bool
	raw          [headerSize]byte
}

func parseHeader(b []byte, off int64) (*header, error) {
	if len(b) < headerSize {
		return nil, fmtErr(image.ErrCorrupt, off, "dynamic header", "short header: %d bytes", len(b))
	}
	if !bytes.Equal(b[:8], cookieHeader) {
		return nil, fmtErr(image.ErrCorrupt, off, "dynamic header cookie", "no \"cxsparse\" cookie")
	}
	be := binary.BigEndian
	h := &header{}
	copy(h.raw[:], b)
	h.DataOffset = be.Uint64(b[8:])
	h.TableOffset = be.Uint64(b[16:])
	h.Version = be.Uint32(b[24:])
	h.MaxEntries = be.Uint32(b[28:])
	h.BlockSize = be.Uint32(b[32:])
	h.Checksum = be.Uint32(b[36:])
	copy(h.ParentUUID[:], b[40:56])
	h.ParentTime = be.Uint32(b[56:])
	copy(h.ParentName[:], b[64:576])
	for i := range h.Locators {
		p := b[576+24*i:]
		h.Locators[i] = locator{be.Uint32(p), be.Uint32(p[4:]), be.Uint32(p[8:]), be.Uint64(p[16:])}
	}
	h.reservedZero = be.Uint32(b[60:]) == 0 && image.IsZero(b[768:1024])
	if sum := checksum(b[:headerSize], 36); sum != h.Checksum {
		return nil, fmtErr(image.ErrCorrupt, off+36, "header checksum", "stored %#08x, computed %#08x", h.Checksum, sum)
	}
	if h.Version != headerVersion {
		return nil, fmtErr(image.ErrUnsupported, off+24, "header_version", "version %#08x (want 0x00010000)", h.Version)
	}
	if h.BlockSize < sectorSize || h.BlockSize > maxBlockSize || h.BlockSize&(h.BlockSize-1) != 0 {
		return nil, fmtErr(image.ErrCorrupt, off+32, "block_size", "block size %d is not a power of two in [512, %d]", h.BlockSize, maxBlockSize)
	}
	if h.MaxEntries > maxBATEntries {
		return nil, fmtErr(image.ErrCorrupt, off+28, "max_table_entries", "%d entries exceed the cap %d", h.MaxEntries, maxBATEntries)
	}
	if h.TableOffset%sectorSize != 0 || h.TableOffset < footerSize || h.TableOffset > 1<<50 {
		return nil, fmtErr(image.ErrCorrupt, off+16, "table_offset", "BAT offset %d is not a sector past the footer copy", h.TableOffset)
	}
	return h, nil
}

func (h *header) encode() []byte {
	b := make([]byte, headerSize)
	copy(b, h.raw[:]) // keeps reserved bytes as read
	be := binary.BigEndian
	copy(b, cookieHeader)
	be.PutUint64(b[8:], h.DataOffset)
	be.PutUint64(b[16:], h.TableOffset)
	be.PutUint32(b[24:], h.Version)
	be.PutUint32(b[28:], h.MaxEntries)
	be.PutUint32(b[32:], h.BlockSize)
	copy(b[40:56], h.ParentUUID[:])
	be.PutUint32(b[56:], h.ParentTime)
	copy(b[64:576], h.ParentName[:])
	for i, l := range h.Locators {
		p := b[576+24*i:]
		be.PutUint32(p, l.Code)
		be.PutUint32(p[4:], l.DataSpace)
		be.PutUint32(p[8:], l.DataLength)
		be.PutUint64(p[16:], l.DataOffset)
	}
	h.Checksum = checksum(b, 36)
	be.PutUint32(b[36:], h.Checksum)
	return b
}

// bitmapBytes is the size of one block's sector bitmap on disk.
func bitmapBytes(blockSize uint32) int64 {
	n := int64(blockSize) / sectorSize / 8
	return roundUp(n, sectorSize)
}

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }

// decodeUTF16 turns UTF-16 bytes into a string, stopping at a NUL.
func decodeUTF16(b []byte, bigEndian bool) (string, error) {
	if len(b)%2 != 0 {
		b = b[:len(b)-1]
	}
	u := make([]uint16, 0, len(b)/2)
	for i := 0; i+1 < len(b); i += 2 {
		var c uint16
		if bigEndian {
			c = binary.BigEndian.Uint16(b[i:])
		} else {
			c = binary.LittleEndian.Uint16(b[i:])
		}
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	r := utf16.Decode(u)
	for _, c := range r {
		if c == 0xFFFD {
			return "", fmt.Errorf("invalid UTF-16")
		}
	}
	return string(r), nil
}

func encodeUTF16(s string, bigEndian bool) []byte {
	u := utf16.Encode([]rune(s))
	b := make([]byte, 2*len(u))
	for i, c := range u {
		if bigEndian {
			binary.BigEndian.PutUint16(b[2*i:], c)
		} else {
			binary.LittleEndian.PutUint16(b[2*i:], c)
		}
	}
	return b
}

func vhdTime(t time.Time) uint32 {
	d := t.Unix() - vhdEpoch.Unix()
	if d < 0 {
		return 0
	}
	return uint32(d)
}
