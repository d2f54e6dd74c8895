package qcow2

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"

	"github.com/blktap-go/blktap/formats/image"
)

// On-disk constants (docs/interop/qcow2.txt).
const (
	magic = "QFI\xfb"

	v2HeaderLen = 72
	v3HeaderLen = 104 // minimum header_length for version 3
	ourHdrLen   = 112 // what we write: v3 fields plus compression_type and padding

	minClusterBits = 9  // 512 B
	maxClusterBits = 21 // 2 MiB, the largest qemu opens

	// Incompatible feature bits.
	incDirty        = 1 << 0
	incCorrupt      = 1 << 1
	incExternalData = 1 << 2
	incCompression  = 1 << 3
	incExtendedL2   = 1 << 4
	incKnown        = incDirty | incCorrupt | incExternalData | incCompression | incExtendedL2

	// Compatible feature bits.
	compatLazyRefcounts = 1 << 0

	// Header extension types.
	extEnd          = 0x00000000
	extBackingFmt   = 0xe2792aca
	extFeatureNames = 0x6803f857
	extBitmaps      = 0x23852875
	extFDE          = 0x0537be77
	extDataFile     = 0x44415441

	// Table entry bits.
	entryCopied     = uint64(1) << 63
	entryCompressed = uint64(1) << 62
	entryZero       = uint64(1) << 0
	offsetMask      = uint64(0x00fffffffffffe00) // bits 9-55

	maxBackingName = 1023           // qemu refuses longer backing names
	maxL1Bytes     = 32 << 20       // qemu's cap on an L1 table
	maxRefTable    = 8 << 20        // cap on the refcount table we read (bytes)
	maxSnapshots   = 65536          // qemu's cap on nb_snapshots
	maxSnapTable   = 64 << 20       // cap on the snapshot table we read (bytes)
	maxExtData     = 1024           // cap on a snapshot's extra data
	maxFileSize    = int64(1) << 56 // offsets are 56-bit
)

// header is the decoded fixed header plus the extensions we understand.
type header struct {
	version           uint32
	backingOffset     uint64
	backingSize       uint32
	clusterBits       uint32
	size              uint64
	cryptMethod       uint32
	l1Size            uint32
	l1Offset          uint64
	refTableOffset    uint64
	refTableClusters  uint32
	nbSnapshots       uint32
	snapshotsOffset   uint64
	incompatible      uint64
	compatible        uint64
	autoclear         uint64
	refcountOrder     uint32
	headerLength      uint32
	compressionType   uint8
	backingName       string
	backingFormat     string
	featureNames      map[string]string // "incompatible/3" -> name, from the feature name table
	hasBitmaps        bool
	hasDataFile       bool
	hasFDE            bool
	extensionsEnd     int64 // offset just past the end-of-extensions marker
	unknownExtensions int
}

// ferr builds a positional error of class cls.
func ferr(cls error, off int64, field, format string, args ...any) error {
	return &image.FormatError{Format: "qcow2", Offset: off, Field: field, Err: cls, Detail: fmt.Sprintf(format, args...)}
}

func corrupt(off int64, field, format string, args ...any) error {
	return ferr(image.ErrCorrupt, off, field, format, args...)
}

func unsupported(off int64, field, format string, args ...any) error {
	return ferr(image.ErrUnsupported, off, field, format, args...)
}

// Detect reports whether header (the first bytes of a file, 512 are
// plenty) starts a qcow2 image: the magic and version 2 or 3. Version 1
// (qcow) has the same magic and is not ours.
func Detect(header []byte) bool {
	if len(header) < 8 || string(header[:4]) != magic {
		return false
	}
	v := binary.BigEndian.Uint32(header[4:8])
	return v == 2 || v == 3
}

// readHeader decodes and validates the header in the first cluster of r,
// a file of fileSize bytes. It checks every offset and size it returns
// against the file and the caps above, so callers may trust them.
func readHeader(r io.ReaderAt, fileSize int64) (*header, error) {
	var fixed [v3HeaderLen]byte
	n, err := r.ReadAt(fixed[:], 0)
	if n < 8 {
		if err != nil && err != io.EOF {
			return nil, fmt.Errorf("qcow2: read header: %w", err)
		}
		return nil, ferr(image.ErrWrongFormat, 0, "magic", "file too short for a qcow2 header (%d bytes)", n)
	}
	if string(fixed[:4]) != magic {
		return nil, ferr(image.ErrWrongFormat, 0, "magic", "not a qcow2 image (magic %q)", fixed[:4])
	}
	h, err := decodeFixed(fixed[:], n)
	if err != nil {
		return nil, err
	}

	if h.clusterBits < minClusterBits || h.clusterBits > maxClusterBits {
		return nil, unsupported(20, "cluster_bits", "%d (cluster sizes 512 B to 2 MiB are supported)", h.clusterBits)
	}
	cs := uint64(1) << h.clusterBits
	if h.version == 3 {
		if h.headerLength < v3HeaderLen || h.headerLength%8 != 0 || uint64(h.headerLength) > cs {
			return nil, corrupt(100, "header_length", "%d (must be >= 104, a multiple of 8 and inside the first cluster)", h.headerLength)
		}
		if h.refcountOrder > 6 {
			return nil, corrupt(96, "refcount_order", "%d (at most 6: 64-bit refcounts)", h.refcountOrder)
		}
		if h.headerLength > v3HeaderLen {
			var b [1]byte
			if _, err := r.ReadAt(b[:], 104); err != nil {
				return nil, corrupt(104, "compression_type", "unreadable: %v", err)
			}
			h.compressionType = b[0]
		}
	}
	if h.size > uint64(maxFileSize) {
		return nil, unsupported(24, "size", "virtual size %d is larger than 2^56", h.size)
	}

	// Extensions live between the header and the backing name (or the end
	// of the first cluster).
	extEndLimit := int64(cs)
	if h.backingOffset != 0 && h.backingOffset < cs {
		extEndLimit = int64(h.backingOffset)
	}
	if err := h.readExtensions(r, int64(h.headerLength), extEndLimit); err != nil {
		return nil, err
	}

	if h.backingOffset != 0 {
		if err := h.readBackingName(r, cs); err != nil {
			return nil, err
		}
	}

	if err := h.checkTables(fileSize, cs); err != nil {
		return nil, err
	}
	return h, nil
}

// decodeFixed decodes the fixed part of the header, n bytes of which the
// file holds, refusing versions other than 2 and 3.
func decodeFixed(fixed []byte, n int) (*header, error) {
	be := binary.BigEndian
	h := &header{version: be.Uint32(fixed[4:])}
	switch h.version {
	case 2:
		if n < v2HeaderLen {
			return nil, corrupt(0, "header", "file ends inside the version 2 header (%d bytes)", n)
		}
	case 3:
		if n < v3HeaderLen {
			return nil, corrupt(0, "header", "file ends inside the version 3 header (%d bytes)", n)
		}
	case 1:
		return nil, ferr(image.ErrWrongFormat, 4, "version", "version 1 is qcow, not qcow2")
	default:
		return nil, unsupported(4, "version", "version %d (only 2 and 3 exist)", h.version)
	}
	h.backingOffset = be.Uint64(fixed[8:])
	h.backingSize = be.Uint32(fixed[16:])
	h.clusterBits = be.Uint32(fixed[20:])
	h.size = be.Uint64(fixed[24:])
	h.cryptMethod = be.Uint32(fixed[32:])
	h.l1Size = be.Uint32(fixed[36:])
	h.l1Offset = be.Uint64(fixed[40:])
	h.refTableOffset = be.Uint64(fixed[48:])
	h.refTableClusters = be.Uint32(fixed[56:])
	h.nbSnapshots = be.Uint32(fixed[60:])
	h.snapshotsOffset = be.Uint64(fixed[64:])
	h.refcountOrder = 4
	h.headerLength = v2HeaderLen
	if h.version == 3 {
		h.incompatible = be.Uint64(fixed[72:])
		h.compatible = be.Uint64(fixed[80:])
		h.autoclear = be.Uint64(fixed[88:])
		h.refcountOrder = be.Uint32(fixed[96:])
		h.headerLength = be.Uint32(fixed[100:])
	}
	return h, nil
}

// readBackingName reads the backing file's name, which must lie inside
// the first cluster.
func (h *header) readBackingName(r io.ReaderAt, cs uint64) error {
	if h.backingSize == 0 || h.backingSize > maxBackingName {
		return corrupt(16, "backing_file_size", "%d (must be 1..%d)", h.backingSize, maxBackingName)
	}
	if h.backingOffset >= cs || h.backingOffset+uint64(h.backingSize) > cs {
		return corrupt(8, "backing_file_offset", "backing name at %d+%d is outside the first cluster", h.backingOffset, h.backingSize)
	}
	name := make([]byte, h.backingSize)
	if _, err := r.ReadAt(name, int64(h.backingOffset)); err != nil {
		return corrupt(int64(h.backingOffset), "backing_file_name", "unreadable: %v", err)
	}
	if bytes.IndexByte(name, 0) >= 0 {
		return corrupt(int64(h.backingOffset), "backing_file_name", "contains a NUL byte")
	}
	h.backingName = string(name)
	return nil
}

// checkTables: the L1 and refcount tables and the snapshot list aligned,
// inside the file and capped before anything is allocated for them.
func (h *header) checkTables(fileSize int64, cs uint64) error {
	// Tables: aligned, inside the file, capped.
	clusterAligned := func(off uint64) bool { return off&(cs-1) == 0 }
	if h.l1Size > 0 || h.l1Offset != 0 {
		if !clusterAligned(h.l1Offset) || h.l1Offset == 0 {
			return corrupt(40, "l1_table_offset", "%#x is not a cluster-aligned offset past the header", h.l1Offset)
		}
		if uint64(h.l1Size)*8 > maxL1Bytes {
			return corrupt(36, "l1_size", "%d entries is more than the %d-byte cap", h.l1Size, maxL1Bytes)
		}
		if h.l1Offset+uint64(h.l1Size)*8 > uint64(fileSize) {
			return corrupt(40, "l1_table_offset", "L1 table %#x+%d ends past the end of the file (%d)", h.l1Offset, uint64(h.l1Size)*8, fileSize)
		}
	}
	need := l1EntriesFor(h.size, h.clusterBits)
	if uint64(h.l1Size) < need {
		return corrupt(36, "l1_size", "%d entries cannot cover a virtual size of %d (need %d)", h.l1Size, h.size, need)
	}
	if !clusterAligned(h.refTableOffset) || h.refTableOffset == 0 {
		return corrupt(48, "refcount_table_offset", "%#x is not a cluster-aligned offset past the header", h.refTableOffset)
	}
	if h.refTableClusters == 0 || uint64(h.refTableClusters)*cs > maxRefTable {
		return corrupt(56, "refcount_table_clusters", "%d clusters (must be 1..%d bytes)", h.refTableClusters, maxRefTable)
	}
	if h.refTableOffset+uint64(h.refTableClusters)*cs > uint64(fileSize) {
		return corrupt(48, "refcount_table_offset", "refcount table ends past the end of the file")
	}
	if h.nbSnapshots > maxSnapshots {
		return corrupt(60, "nb_snapshots", "%d (at most %d)", h.nbSnapshots, maxSnapshots)
	}
	if h.nbSnapshots > 0 && (h.snapshotsOffset&7 != 0 || h.snapshotsOffset == 0 || h.snapshotsOffset >= uint64(fileSize)) {
		return corrupt(64, "snapshots_offset", "%#x is not an 8-byte aligned offset inside the file", h.snapshotsOffset)
	}
	return nil
}

// readExtensions walks {type, length, data, pad} records from off.
func (h *header) readExtensions(r io.ReaderAt, off, limit int64) error {
	be := binary.BigEndian
	for off < limit {
		if off+8 > limit {
			return corrupt(off, "header_extension", "extension header crosses offset %d", limit)
		}
		var hd [8]byte
		if _, err := r.ReadAt(hd[:], off); err != nil {
			return corrupt(off, "header_extension", "unreadable: %v", err)
		}
		typ, ln := be.Uint32(hd[:4]), int64(be.Uint32(hd[4:]))
		if typ == extEnd {
			h.extensionsEnd = off + 8
			return nil
		}
		data := off + 8
		if ln > limit-data {
			return corrupt(off, "header_extension", "extension %#x of %d bytes runs past offset %d", typ, ln, limit)
		}
		buf := make([]byte, ln) // ln < one cluster (limit <= cluster size)
		if _, err := r.ReadAt(buf, data); err != nil {
			return corrupt(data, "header_extension", "unreadable: %v", err)
		}
		switch typ {
		case extBackingFmt:
			if i := bytes.IndexByte(buf, 0); i >= 0 {
				buf = buf[:i]
			}
			h.backingFormat = string(buf)
		case extFeatureNames:
			h.featureNames = map[string]string{}
			for i := 0; i+48 <= len(buf); i += 48 {
				kind := [...]string{"incompatible", "compatible", "autoclear"}
				k := int(buf[i])
				if k > 2 {
					continue
				}
				name := buf[i+2 : i+48]
				if j := bytes.IndexByte(name, 0); j >= 0 {
					name = name[:j]
				}
				h.featureNames[fmt.Sprintf("%s/%d", kind[k], buf[i+1])] = string(name)
			}
		case extBitmaps:
			h.hasBitmaps = true
		case extDataFile:
			h.hasDataFile = true
		case extFDE:
			h.hasFDE = true
		default:
			h.unknownExtensions++
		}
		off = data + (ln+7)&^7
	}
	// No end marker before the limit: qemu accepts this (the area is
	// simply full), so do we.
	h.extensionsEnd = limit
	return nil
}

// checkFeatures refuses features we do not implement, naming them.
func (h *header) checkFeatures(readOnly bool) error {
	if h.cryptMethod != 0 {
		name := "AES"
		if h.cryptMethod == 2 {
			name = "LUKS"
		}
		return unsupported(32, "crypt_method", "encryption (%s, crypt_method %d) is not supported", name, h.cryptMethod)
	}
	if h.incompatible&incExternalData != 0 || h.hasDataFile {
		return unsupported(72, "incompatible_features", "external data file is not supported")
	}
	if h.incompatible&incExtendedL2 != 0 {
		return unsupported(72, "incompatible_features", "extended L2 entries (subclusters) are not supported")
	}
	if unknown := h.incompatible &^ incKnown; unknown != 0 {
		for b := 0; b < 64; b++ {
			if unknown&(1<<b) != 0 {
				name := h.featureNames[fmt.Sprintf("incompatible/%d", b)]
				if name == "" {
					name = "unknown"
				}
				return unsupported(72, "incompatible_features", "incompatible feature bit %d (%s) is not supported", b, name)
			}
		}
	}
	switch h.compressionType {
	case compressionZlib, compressionZstd:
	default:
		return unsupported(104, "compression_type", "compression_type %d is not supported", h.compressionType)
	}
	if h.incompatible&incCorrupt != 0 && !readOnly {
		return corrupt(72, "incompatible_features", "image is marked corrupt: open it read-only, or repair it with `%s`", RepairHint)
	}
	return nil
}

// l1EntriesFor is the number of L1 entries a virtual size needs.
func l1EntriesFor(size uint64, clusterBits uint32) uint64 {
	l2Bits := clusterBits - 3
	shift := clusterBits + l2Bits
	return (size + (uint64(1) << shift) - 1) >> shift
}

// encodeHeader lays out our header, extensions and backing name into the
// first cluster (returned slice is cluster-sized).
func encodeHeader(h *header) ([]byte, error) {
	cs := 1 << h.clusterBits
	buf := make([]byte, cs)
	be := binary.BigEndian
	copy(buf, magic)
	be.PutUint32(buf[4:], h.version)
	be.PutUint32(buf[20:], h.clusterBits)
	be.PutUint64(buf[24:], h.size)
	be.PutUint32(buf[32:], h.cryptMethod)
	be.PutUint32(buf[36:], h.l1Size)
	be.PutUint64(buf[40:], h.l1Offset)
	be.PutUint64(buf[48:], h.refTableOffset)
	be.PutUint32(buf[56:], h.refTableClusters)
	be.PutUint32(buf[60:], h.nbSnapshots)
	be.PutUint64(buf[64:], h.snapshotsOffset)
	off := v2HeaderLen
	if h.version == 3 {
		be.PutUint64(buf[72:], h.incompatible)
		be.PutUint64(buf[80:], h.compatible)
		be.PutUint64(buf[88:], h.autoclear)
		be.PutUint32(buf[96:], h.refcountOrder)
		be.PutUint32(buf[100:], ourHdrLen)
		buf[104] = h.compressionType
		off = ourHdrLen
	}
	putExt := func(typ uint32, data []byte) (err error) {
		off, err = putExtension(buf, off, typ, data)
		return err
	}
	if h.backingFormat != "" {
		if err := putExt(extBackingFmt, []byte(h.backingFormat)); err != nil {
			return nil, err
		}
	}
	if h.version == 3 {
		// The feature name table lets other tools print names for our bits.
		var t []byte
		add := func(kind, bit byte, name string) {
			e := make([]byte, 48)
			e[0], e[1] = kind, bit
			copy(e[2:], name)
			t = append(t, e...)
		}
		add(0, 0, "dirty bit")
		add(0, 1, "corrupt bit")
		add(0, 2, "external data file")
		add(0, 3, "compression type")
		add(0, 4, "extended L2 entries")
		add(1, 0, "lazy refcounts")
		add(2, 0, "bitmaps")
		add(2, 1, "raw external data")
		if off+8+len(t)+8+len(h.backingName) <= cs {
			_ = putExt(extFeatureNames, t)
		}
	}
	off += 8 // end-of-extensions marker (zeros)
	if h.backingName != "" {
		if len(h.backingName) > maxBackingName {
			return nil, fmt.Errorf("qcow2: backing file name longer than %d bytes", maxBackingName)
		}
		if off+len(h.backingName) > cs {
			return nil, fmt.Errorf("qcow2: backing file name does not fit in the first cluster")
		}
		be.PutUint64(buf[8:], uint64(off))
		be.PutUint32(buf[16:], uint32(len(h.backingName)))
		copy(buf[off:], h.backingName)
	}
	return buf, nil
}

// putExtension lays one header extension record (type, length, data,
// zero padding to 8 bytes) into the first cluster buf at off, leaving
// room for the end marker, and returns the offset past it.
func putExtension(buf []byte, off int, typ uint32, data []byte) (int, error) {
	padded := (len(data) + 7) &^ 7
	if off+8+padded+8 > len(buf) {
		return off, fmt.Errorf("qcow2: header extensions do not fit in one %d-byte cluster", len(buf))
	}
	binary.BigEndian.PutUint32(buf[off:], typ)
	binary.BigEndian.PutUint32(buf[off+4:], uint32(len(data)))
	copy(buf[off+8:], data)
	clear(buf[off+8+len(data) : off+8+padded])
	return off + 8 + padded, nil
}
