package qcow

import (
	"encoding/binary"
	"fmt"
	"io"
	"math/bits"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// CreateOptions says what image Create makes. The defaults are qemu-img's.
type CreateOptions struct {
	// Size is the virtual size in bytes, rounded up to a multiple of 512
	// as qemu-img rounds it. 0 with Backing set
	// takes the backing image's size through OpenBacking.
	Size int64
	// Backing is stored as given (relative names resolve against the new
	// image's directory when it is opened).
	Backing string
	// BackingFormat is accepted for symmetry with the other formats but
	// not stored: qcow v1 has no field for it (qemu-img does the same).
	BackingFormat string
	// ClusterSize is a power of two from 512 to 64 KiB; 0 takes qemu's
	// default: 4 KiB, or 512 B with a backing file (so a small guest write
	// copies little of the backing file).
	ClusterSize int64
	// L2Bits is log2 of the entries per L2 table (6..13); 0 takes qemu's
	// default (9, or 12 with a backing file; with ClusterSize given,
	// one cluster of entries capped so cluster_bits+l2_bits <= 27, the most
	// libqcow accepts).
	L2Bits int
	// OpenBacking opens the backing file when Size is 0, to learn its size.
	OpenBacking image.OpenFunc
	// Reserve preallocates (fallocate, keeping the file size) the space the
	// image can grow to, so later allocations cannot run out of space and
	// land contiguously: what `qcow-create -r` meant.
	Reserve bool
}

// Create makes a new, empty qcow image at path. It never overwrites an
// existing file (O_EXCL), and the file and its directory entry are durable
// when it returns. The layout is qemu-img's: header, backing name, L1 table
// at the next multiple of 8, file padded to a multiple of 512.
func Create(path string, opts CreateOptions) (err error) {
	h, err := createHeader(opts)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("qcow: create: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(path)
		}
	}()
	buf := initialFile(h)
	if err := hostfile.WriteFull(f, buf, 0); err != nil {
		return fmt.Errorf("qcow: create: %w", err)
	}
	fileEnd := int64(len(buf))
	if opts.Reserve {
		maxGrowth := h.l1Entries*alignUp(h.l2TableBytes, h.clusterSize) + alignUp(int64(h.size), h.clusterSize) + h.clusterSize
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_KEEP_SIZE, fileEnd, maxGrowth); err != nil {
			return fmt.Errorf("qcow: reserving %d bytes: %w", maxGrowth, err)
		}
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("qcow: create: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("qcow: create: %w", err)
	}
	// The new name must survive a crash too.
	if err := (hostfile.OSFS{}).SyncDir(filepath.Dir(path)); err != nil {
		return fmt.Errorf("qcow: create: %w", err)
	}
	return nil
}

// initialFile is the whole new image: header, backing name, zeroed L1,
// the L1 padded to a multiple of 512 bytes as qemu-img pads it.
func initialFile(h *header) []byte {
	buf := make([]byte, int64(h.l1Offset)+alignUp(h.l1Entries*8, 512))
	copy(buf, encodeHeader(h))
	copy(buf[headerSize:], h.backingName)
	return buf
}

func createHeader(opts CreateOptions) (*header, error) {
	size := opts.Size
	if size == 0 && opts.Backing != "" {
		if opts.OpenBacking == nil {
			return nil, fmt.Errorf("qcow: create: size 0 needs CreateOptions.OpenBacking to read the backing file's size")
		}
		b, err := opts.OpenBacking(opts.Backing, opts.BackingFormat)
		if err != nil {
			return nil, fmt.Errorf("qcow: create: opening backing file %q: %w", opts.Backing, err)
		}
		size = b.Size()
		b.Close()
	}
	size = alignUp(size, 512) // as qemu-img does: a whole number of sectors
	if size < 2 || size > maxVirtualSize {
		return nil, fmt.Errorf("qcow: create: virtual size %d outside 2..2^62", size)
	}
	if len(opts.Backing) > maxBackingName {
		return nil, fmt.Errorf("qcow: create: backing file name of %d bytes exceeds %d", len(opts.Backing), maxBackingName)
	}
	for i := 0; i < len(opts.Backing); i++ {
		if opts.Backing[i] == 0 {
			return nil, fmt.Errorf("qcow: create: NUL byte in backing file name")
		}
	}
	cb, l2b := 12, 9
	if opts.Backing != "" {
		cb, l2b = 9, 12
	}
	if opts.ClusterSize != 0 {
		cs := opts.ClusterSize
		if cs < 1<<minClusterBits || cs > 1<<maxClusterBits || cs&(cs-1) != 0 {
			return nil, fmt.Errorf("qcow: create: cluster size %d is not a power of two from 512 to 65536", cs)
		}
		cb = bits.TrailingZeros64(uint64(cs))
		// One cluster of entries, but cluster_bits+l2_bits at most 27:
		// libqcow (qcowinfo) refuses more.
		l2b = min(max(min(cb-3, 27-cb), minL2Bits), maxL2Bits)
	}
	if opts.L2Bits != 0 {
		if opts.L2Bits < minL2Bits || opts.L2Bits > maxL2Bits {
			return nil, fmt.Errorf("qcow: create: l2_bits %d outside %d..%d", opts.L2Bits, minL2Bits, maxL2Bits)
		}
		l2b = opts.L2Bits
	}
	h := &header{
		version:     1,
		size:        uint64(size),
		clusterBits: uint8(cb),
		l2Bits:      uint8(l2b),
		backingName: opts.Backing,
	}
	hdrEnd := uint64(headerSize)
	if opts.Backing != "" {
		h.backingOffset = headerSize
		h.backingSize = uint32(len(opts.Backing))
		hdrEnd += uint64(len(opts.Backing))
	}
	h.l1Offset = (hdrEnd + 7) &^ 7
	shift := uint(cb + l2b)
	h.l1Entries = int64((uint64(size) + 1<<shift - 1) >> shift)
	if h.l1Entries*8 > maxL1Bytes {
		return nil, fmt.Errorf("qcow: create: L1 table of %d bytes exceeds %d; use larger clusters",
			h.l1Entries*8, maxL1Bytes)
	}
	h.clusterSize = 1 << cb
	h.l2Entries = 1 << l2b
	h.l2TableBytes = h.l2Entries * 8
	return h, nil
}

// QcowCreateUsage is the seed tool's usage text.
const QcowCreateUsage = "Qcow-utils: v1.0.0\nusage: qcow-create [-h help] [-r reserve] <SIZE(MB)> <FILENAME> [<BACKING_FILENAME>]"

// QcowCreate is the seed's `qcow-create [-r] SIZE_MB FILE [BACKING]`. As in
// the 2006 tool, a backing file is recorded by its absolute, symlink-free
// path, must exist, and sets the virtual size (SIZE_MB is then ignored; a
// qcow or qcow2 backing file's virtual size, else its length); reserve
// preallocates the space the image can grow to instead of leaving it sparse.
func QcowCreate(sizeMB int64, file, backing string, reserve bool) error {
	opts := CreateOptions{Reserve: reserve}
	if backing == "" {
		if sizeMB <= 0 || sizeMB > maxVirtualSize>>20 {
			return fmt.Errorf("qcow-create: size %d MB out of range", sizeMB)
		}
		opts.Size = sizeMB << 20
		return Create(file, opts)
	}
	abs, err := filepath.Abs(backing)
	if err == nil {
		abs, err = filepath.EvalSymlinks(abs)
	}
	if err != nil {
		return fmt.Errorf("qcow-create: backing file: %w", err)
	}
	size, err := backingFileSize(abs)
	if err != nil {
		return fmt.Errorf("qcow-create: backing file %s: %w", abs, err)
	}
	opts.Size, opts.Backing = size, abs
	return Create(file, opts)
}

// backingFileSize is a qcow/qcow2 file's virtual size (both keep it at byte
// 24), else the file's or block device's length.
func backingFileSize(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var hdr [32]byte
	if n, _ := f.ReadAt(hdr[:], 0); n == len(hdr) && string(hdr[:4]) == string(magic) {
		v := binary.BigEndian.Uint32(hdr[4:])
		if v >= 1 && v <= 3 {
			s := binary.BigEndian.Uint64(hdr[24:])
			if s > maxVirtualSize {
				return 0, fmt.Errorf("virtual size %d out of range", s)
			}
			return int64(s), nil
		}
	}
	return f.Seek(0, io.SeekEnd)
}
