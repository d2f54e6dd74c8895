package vmdk

import (
	"encoding/binary"
	"fmt"
	"math"

	"github.com/blktap-go/blktap/formats/image"
)

const (
	sectorSize = 512

	// magicSparse is "KDMV" as it appears in the file (the spec writes it
	// as the little-endian u32 0x564d444b).
	magicSparse = "KDMV"
	// magicCOWD opens the older ESX sparse extents (vmfsSparse), which we
	// recognise only to refuse them by name.
	magicCOWD = "COWD"

	flagNLDetect   = 1 << 0
	flagRedundant  = 1 << 1
	flagZeroGrain  = 1 << 2
	flagCompressed = 1 << 16
	flagMarkers    = 1 << 17

	// gdAtEnd in gd_offset says the real header is in the footer.
	gdAtEnd = math.MaxUint64

	compressDeflate = 1

	// Caps on what a header may claim. Larger values are refused before any
	// allocation sized by them happens (docs/ARCHITECTURE.md, section "Trust").
	maxGrainSectors  = 1 << 17 // 64 MiB grains
	maxGTEsPerGT     = 512     // qemu's and VMware's limit
	maxDescriptor    = 1 << 20 // bytes of descriptor text
	maxGDEntries     = 1 << 24 // 64 MiB of directory: covers 512 PiB at defaults
	maxCapacitySects = math.MaxInt64 / sectorSize
)

// sparseHeader is the 512-byte header of a hosted sparse extent:
//
//	 0      4        8      12          20           28           36
//	+------+--------+------+-----------+------------+------------+-----------+
//	| KDMV | version| flags| capacity  | grain_size | desc_offset| desc_size |
//	+------+--------+------+-----------+------------+------------+-----------+
//	 44          48          56          64            72      73         77
//	+-----------+-----------+-----------+-------------+-------+----------+--------+
//	| num_gtes  | rgd_offset| gd_offset | grain_offset| dirty | \n \r\n  | compr. |
//	+-----------+-----------+-----------+-------------+-------+----------+--------+
//
// All fields are little-endian; every offset and size is in 512-byte
// sectors except num_gtes (entries per grain table).
type sparseHeader struct {
	Version           uint32
	Flags             uint32
	Capacity          uint64
	GrainSize         uint64
	DescOffset        uint64
	DescSize          uint64
	NumGTEsPerGT      uint32
	RGDOffset         uint64
	GDOffset          uint64
	GrainOffset       uint64
	UncleanShutdown   bool
	CompressAlgorithm uint16
}

var checkBytes = [4]byte{'\n', ' ', '\r', '\n'}

func fmtErr(off int64, field string, class error, format string, args ...any) error {
	return &image.FormatError{Format: "vmdk", Offset: off, Field: field, Err: class, Detail: fmt.Sprintf(format, args...)}
}

// parseSparseHeader decodes and validates a header sector. base is the
// header's offset in the file, for error positions.
func parseSparseHeader(b []byte, base int64) (*sparseHeader, error) {
	if len(b) < sectorSize {
		return nil, fmtErr(base, "header", image.ErrCorrupt, "short header: %d bytes", len(b))
	}
	if string(b[0:4]) != magicSparse {
		if string(b[0:4]) == magicCOWD {
			return nil, fmtErr(base, "magic", image.ErrUnsupported, "COWD (vmfsSparse, VMDK3) extents")
		}
		return nil, fmtErr(base, "magic", image.ErrWrongFormat, "not a VMDK sparse extent")
	}
	le := binary.LittleEndian
	h := &sparseHeader{
		Version:           le.Uint32(b[4:]),
		Flags:             le.Uint32(b[8:]),
		Capacity:          le.Uint64(b[12:]),
		GrainSize:         le.Uint64(b[20:]),
		DescOffset:        le.Uint64(b[28:]),
		DescSize:          le.Uint64(b[36:]),
		NumGTEsPerGT:      le.Uint32(b[44:]),
		RGDOffset:         le.Uint64(b[48:]),
		GDOffset:          le.Uint64(b[56:]),
		GrainOffset:       le.Uint64(b[64:]),
		UncleanShutdown:   b[72] != 0,
		CompressAlgorithm: le.Uint16(b[77:]),
	}
	if h.Version < 1 || h.Version > 3 {
		return nil, fmtErr(base+4, "version", image.ErrUnsupported, "sparse extent version %d", h.Version)
	}
	if h.Flags&flagNLDetect != 0 && [4]byte(b[73:77]) != checkBytes {
		return nil, fmtErr(base+73, "check_bytes", image.ErrCorrupt, "newline check bytes %q mangled (file transferred in text mode?)", b[73:77])
	}
	if h.Capacity > maxCapacitySects {
		return nil, fmtErr(base+12, "capacity", image.ErrCorrupt, "%d sectors overflows a 64-bit byte size", h.Capacity)
	}
	if h.GrainSize == 0 {
		return nil, fmtErr(base+20, "grain_size", image.ErrCorrupt, "zero")
	}
	if h.GrainSize > maxGrainSectors {
		return nil, fmtErr(base+20, "grain_size", image.ErrUnsupported, "%d sectors (limit %d)", h.GrainSize, maxGrainSectors)
	}
	if h.NumGTEsPerGT == 0 {
		return nil, fmtErr(base+44, "num_gtes_per_gt", image.ErrCorrupt, "zero")
	}
	if h.NumGTEsPerGT > maxGTEsPerGT {
		return nil, fmtErr(base+44, "num_gtes_per_gt", image.ErrUnsupported, "%d entries (limit %d)", h.NumGTEsPerGT, maxGTEsPerGT)
	}
	if h.DescSize > maxDescriptor/sectorSize {
		return nil, fmtErr(base+36, "desc_size", image.ErrCorrupt, "%d sectors (limit %d)", h.DescSize, maxDescriptor/sectorSize)
	}
	if h.DescSize != 0 && h.DescOffset == 0 {
		return nil, fmtErr(base+28, "desc_offset", image.ErrCorrupt, "descriptor size %d at offset 0", h.DescSize)
	}
	if h.Flags&flagCompressed != 0 && h.CompressAlgorithm != compressDeflate {
		return nil, fmtErr(base+77, "compress_algorithm", image.ErrUnsupported, "compression algorithm %d (only 1, deflate)", h.CompressAlgorithm)
	}
	if h.gdEntries() > maxGDEntries {
		return nil, fmtErr(base+12, "capacity", image.ErrUnsupported, "%d grain directory entries (limit %d)", h.gdEntries(), maxGDEntries)
	}
	return h, nil
}

// grainBytes is the grain size in bytes.
func (h *sparseHeader) grainBytes() int64 { return int64(h.GrainSize) * sectorSize }

// gtSectors is the size of one grain table in sectors, rounded up.
func (h *sparseHeader) gtSectors() uint64 {
	return (uint64(h.NumGTEsPerGT)*4 + sectorSize - 1) / sectorSize
}

// gdEntries is the number of grain tables needed to cover the capacity.
func (h *sparseHeader) gdEntries() uint64 {
	per := uint64(h.NumGTEsPerGT) * h.GrainSize
	if per == 0 {
		return 0
	}
	return h.Capacity/per + min(1, h.Capacity%per)
}

func (h *sparseHeader) marshal() []byte {
	b := make([]byte, sectorSize)
	le := binary.LittleEndian
	copy(b, magicSparse)
	le.PutUint32(b[4:], h.Version)
	le.PutUint32(b[8:], h.Flags)
	le.PutUint64(b[12:], h.Capacity)
	le.PutUint64(b[20:], h.GrainSize)
	le.PutUint64(b[28:], h.DescOffset)
	le.PutUint64(b[36:], h.DescSize)
	le.PutUint32(b[44:], h.NumGTEsPerGT)
	le.PutUint64(b[48:], h.RGDOffset)
	le.PutUint64(b[56:], h.GDOffset)
	le.PutUint64(b[64:], h.GrainOffset)
	if h.UncleanShutdown {
		b[72] = 1
	}
	copy(b[73:77], checkBytes[:])
	le.PutUint16(b[77:], h.CompressAlgorithm)
	return b
}
