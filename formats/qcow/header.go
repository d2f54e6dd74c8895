package qcow

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
)

const (
	formatName = "qcow"

	headerSize    = 48 // the fixed v1 header
	xenHeaderSize = 16 // blktap's optional extension right after it

	minClusterBits = 9 // the range qemu accepts; outside it no tool made the image
	maxClusterBits = 16
	minL2Bits      = 6
	maxL2Bits      = 13

	// maxBackingName is qemu's limit on the stored backing file name.
	maxBackingName = 1023

	// maxL1Bytes caps the L1 table we hold in memory whatever the header
	// claims (docs/ARCHITECTURE.md, section "Trust": a header's sizes are capped before anything is allocated). 32 MiB of L1 maps 2^22 L2 tables: at the qemu
	// defaults that is 8 TiB (4 KiB clusters) or 8 TiB (512 B / l2_bits 12).
	maxL1Bytes = 32 << 20

	// maxVirtualSize keeps every offset computation inside int64.
	maxVirtualSize = 1 << 62

	cryptNone = 0
	cryptAES  = 1

	xenFlagSparse      = 1 // SPARSE_FILE in blktap
	xenFlagL1BigEndian = 2 // L1 stored big-endian (old tapdisk used host order)

	flagCompressed = uint64(1) << 63
)

var (
	magic    = []byte{'Q', 'F', 'I', 0xfb}
	xenMagic = []byte{'X', 'E', 'N', 0xfb}
)

// header is the decoded, validated v1 header.
type header struct {
	version         uint32
	backingOffset   uint64
	backingSize     uint32
	mtime           uint32
	size            uint64
	clusterBits     uint8
	l2Bits          uint8
	cryptMethod     uint32
	l1Offset        uint64
	l1Entries       int64 // computed: ceil(size / 2^(clusterBits+l2Bits))
	backingName     string
	xen             *xenHeader
	l1LittleEndian  bool // blktap extension present with flag 2 clear
	clusterSize     int64
	l2Entries       int64
	l2TableBytes    int64
	compressedShift uint // 63 - clusterBits
}

// xenHeader is blktap1's extension (docs/WIRE.md, section "QCOW").
type xenHeader struct {
	Checksum        uint32
	MinClusterAlloc uint32
	Flags           uint32
}

// Detect reports whether the first bytes of a file are a qcow version 1
// header. It looks at no more than 8 bytes.
func Detect(hdr []byte) bool {
	return len(hdr) >= 8 && bytes.Equal(hdr[:4], magic) &&
		binary.BigEndian.Uint32(hdr[4:8]) == 1
}

func corrupt(off int64, field, format string, args ...any) error {
	return &image.FormatError{Format: formatName, Offset: off, Field: field,
		Err: image.ErrCorrupt, Detail: fmt.Sprintf(format, args...)}
}

func unsupported(off int64, field, format string, args ...any) error {
	return &image.FormatError{Format: formatName, Offset: off, Field: field,
		Err: image.ErrUnsupported, Detail: fmt.Sprintf(format, args...)}
}

// parseHeader decodes and validates the header. buf holds the start of the
// file (at least the first 64 bytes when the file is that long); fileSize
// bounds every offset the header names. readAt fetches the backing name.
func parseHeader(buf []byte, fileSize int64, readAt func([]byte, int64) error) (*header, error) {
	if len(buf) < 8 || !bytes.Equal(buf[:4], magic) {
		return nil, &image.FormatError{Format: formatName, Offset: 0, Field: "magic",
			Err: image.ErrWrongFormat, Detail: "not a qcow image (no QFI\\xfb magic)"}
	}
	h := &header{version: binary.BigEndian.Uint32(buf[4:8])}
	if h.version != 1 {
		if h.version == 2 || h.version == 3 {
			return nil, &image.FormatError{Format: formatName, Offset: 4, Field: "version",
				Err: image.ErrWrongFormat, Detail: fmt.Sprintf("version %d is qcow2, not qcow", h.version)}
		}
		return nil, unsupported(4, "version", "version %d (only 1 is qcow)", h.version)
	}
	if len(buf) < headerSize {
		return nil, corrupt(0, "header", "file is %d bytes, shorter than the 48-byte header", len(buf))
	}
	be := binary.BigEndian
	h.backingOffset = be.Uint64(buf[8:])
	h.backingSize = be.Uint32(buf[16:])
	h.mtime = be.Uint32(buf[20:])
	h.size = be.Uint64(buf[24:])
	h.clusterBits = buf[32]
	h.l2Bits = buf[33]
	h.cryptMethod = be.Uint32(buf[36:])
	h.l1Offset = be.Uint64(buf[40:])

	if h.cryptMethod == cryptAES {
		return nil, unsupported(36, "crypt_method",
			"AES-encrypted qcow images are refused: the scheme is broken and no key handling exists")
	}
	if h.cryptMethod != cryptNone {
		return nil, corrupt(36, "crypt_method", "unknown encryption method %d", h.cryptMethod)
	}
	if h.clusterBits < minClusterBits || h.clusterBits > maxClusterBits {
		return nil, corrupt(32, "cluster_bits", "%d outside %d..%d", h.clusterBits, minClusterBits, maxClusterBits)
	}
	if h.l2Bits < minL2Bits || h.l2Bits > maxL2Bits {
		return nil, corrupt(33, "l2_bits", "%d outside %d..%d", h.l2Bits, minL2Bits, maxL2Bits)
	}
	if h.size < 2 || h.size > maxVirtualSize {
		return nil, corrupt(24, "size", "virtual size %d outside 2..2^62", h.size)
	}
	h.clusterSize = 1 << h.clusterBits
	h.l2Entries = 1 << h.l2Bits
	h.l2TableBytes = h.l2Entries * 8
	h.compressedShift = 63 - uint(h.clusterBits)
	shift := uint(h.clusterBits) + uint(h.l2Bits)
	h.l1Entries = int64((h.size + (1 << shift) - 1) >> shift)
	// The L1 must fit in the file before anything is allocated for it; a
	// real image that big would exceed our cap, which is merely a limit.
	l1Bytes := uint64(h.l1Entries) * 8
	if h.l1Offset < headerSize || h.l1Offset > uint64(fileSize) || l1Bytes > uint64(fileSize)-h.l1Offset {
		return nil, corrupt(40, "l1_table_offset", "L1 table [%d, +%d) for virtual size %d not inside the %d-byte file",
			h.l1Offset, l1Bytes, h.size, fileSize)
	}
	if l1Bytes > maxL1Bytes {
		return nil, unsupported(24, "size", "L1 table of %d bytes exceeds the %d-byte cap", l1Bytes, maxL1Bytes)
	}
	if h.backingOffset != 0 {
		if err := h.readBackingName(fileSize, readAt); err != nil {
			return nil, err
		}
	}
	// blktap1's extension: only when there is no backing file and the L1
	// is 4096-aligned (so the 16 bytes at 48 are not the backing name or L1).
	if h.backingOffset == 0 && h.l1Offset%4096 == 0 && len(buf) >= headerSize+xenHeaderSize &&
		bytes.Equal(buf[48:52], xenMagic) {
		h.xen = &xenHeader{
			Checksum:        be.Uint32(buf[52:]),
			MinClusterAlloc: be.Uint32(buf[56:]),
			Flags:           be.Uint32(buf[60:]),
		}
		h.l1LittleEndian = h.xen.Flags&xenFlagL1BigEndian == 0
	}
	return h, nil
}

// readBackingName reads the backing file's name, bounded by the header's
// own limits and the file, before allocating for it.
func (h *header) readBackingName(fileSize int64, readAt func([]byte, int64) error) error {
	if h.backingSize == 0 || h.backingSize > maxBackingName {
		return corrupt(16, "backing_file_size", "%d outside 1..%d", h.backingSize, maxBackingName)
	}
	if h.backingOffset < headerSize || h.backingOffset > uint64(fileSize) ||
		uint64(h.backingSize) > uint64(fileSize)-h.backingOffset {
		return corrupt(8, "backing_file_offset", "backing name [%d, +%d) not inside the %d-byte file",
			h.backingOffset, h.backingSize, fileSize)
	}
	name := make([]byte, h.backingSize)
	if err := readAt(name, int64(h.backingOffset)); err != nil {
		return fmt.Errorf("qcow: reading backing file name: %w", err)
	}
	if i := bytes.IndexByte(name, 0); i >= 0 {
		return corrupt(int64(h.backingOffset), "backing_file", "NUL byte inside the backing file name")
	}
	h.backingName = string(name)
	return nil
}

// encodeHeader writes the 48-byte v1 header.
func encodeHeader(h *header) []byte {
	b := make([]byte, headerSize)
	be := binary.BigEndian
	copy(b, magic)
	be.PutUint32(b[4:], 1)
	be.PutUint64(b[8:], h.backingOffset)
	be.PutUint32(b[16:], h.backingSize)
	be.PutUint32(b[20:], h.mtime)
	be.PutUint64(b[24:], h.size)
	b[32] = h.clusterBits
	b[33] = h.l2Bits
	be.PutUint32(b[36:], h.cryptMethod)
	be.PutUint64(b[40:], h.l1Offset)
	return b
}

// l1Order is the byte order of L1 entries in this image.
func (h *header) l1Order() binary.ByteOrder {
	if h.l1LittleEndian {
		return binary.LittleEndian
	}
	return binary.BigEndian
}
