package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"path/filepath"

	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// CreateOptions describe a new image. Zero values take qemu-img's
// defaults: version 3 (compat 1.1), 64 KiB clusters, 16-bit refcounts.
type CreateOptions struct {
	Size          int64  // virtual size in bytes (rounded up to 512, as qemu-img does)
	Backing       string // backing file name, stored as given ("" for none)
	BackingFormat string // stored in the backing-format extension ("" to omit)
	ClusterSize   int64  // 512 B .. 2 MiB, a power of two; 0 means 64 KiB
	Compat        string // "1.1" (version 3, default) or "0.10" (version 2)
	RefcountBits  int    // 1, 2, 4, 8, 16, 32 or 64; 0 means 16 (version 2: only 16)
	LazyRefcounts bool   // version 3 only
	// CompressionType of compressed clusters: "" or "zlib" (deflate), or
	// "zstd" (version 3 only, as qemu 5.1 and later write it).
	CompressionType string
}

// Create makes a new, empty qcow2 image at path. It never overwrites an
// existing file (O_EXCL) and returns only once the image and its
// directory entry are durable.
//
// Layout: header (+ extensions, backing name) in cluster 0, then the
// refcount table, the refcount blocks that count the metadata, then the
// L1 table.
func Create(path string, o CreateOptions) error {
	h, meta, err := layout(o)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("qcow2: create: %w", err)
	}
	err = writeLayout(f, h, meta)
	if err == nil {
		err = hostfile.Fdatasync(f)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		// The new name must survive a crash too.
		if err = (hostfile.OSFS{}).SyncDir(filepath.Dir(path)); err != nil {
			err = fmt.Errorf("qcow2: create: %w", err)
		}
	}
	if err != nil {
		os.Remove(path)
		return err
	}
	return nil
}

type metaLayout struct {
	rtc, rbc, l1c int64 // clusters of refcount table, blocks, L1
}

func layout(o CreateOptions) (*header, metaLayout, error) {
	bad := func(format string, args ...any) (*header, metaLayout, error) {
		return nil, metaLayout{}, fmt.Errorf("qcow2: create: "+format, args...)
	}
	if o.Size < 0 || o.Size > maxFileSize {
		return bad("size %d out of range", o.Size)
	}
	cs := o.ClusterSize
	if cs == 0 {
		cs = 64 << 10
	}
	if cs < 512 || cs > 2<<20 || cs&(cs-1) != 0 {
		return bad("cluster size %d must be a power of two from 512 to 2M", cs)
	}
	h := &header{version: 3, clusterBits: uint32(bits.TrailingZeros64(uint64(cs))), refcountOrder: 4}
	switch o.Compat {
	case "", "1.1", "v3":
	case "0.10", "v2":
		h.version = 2
	default:
		return bad("compat %q (want 0.10 or 1.1)", o.Compat)
	}
	if o.RefcountBits != 0 {
		rb := o.RefcountBits
		if rb > 64 || rb&(rb-1) != 0 {
			return bad("refcount bits %d (want a power of two up to 64)", rb)
		}
		if h.version == 2 && rb != 16 {
			return bad("compat 0.10 needs 16-bit refcounts")
		}
		h.refcountOrder = uint32(bits.TrailingZeros(uint(rb)))
	}
	if o.LazyRefcounts {
		if h.version == 2 {
			return bad("lazy refcounts need compat 1.1")
		}
		h.compatible |= compatLazyRefcounts
	}
	switch o.CompressionType {
	case "", "zlib":
	case "zstd":
		if h.version == 2 {
			return bad("compression_type zstd needs compat 1.1")
		}
		h.incompatible |= incCompression
		h.compressionType = compressionZstd
	default:
		return bad("compression_type %q (want zlib or zstd)", o.CompressionType)
	}
	if o.BackingFormat != "" && o.Backing == "" {
		return bad("a backing format without a backing file")
	}
	h.size = uint64((o.Size + 511) &^ 511)
	h.backingName, h.backingFormat = o.Backing, o.BackingFormat
	l1 := l1EntriesFor(h.size, h.clusterBits)
	if l1*8 > maxL1Bytes {
		return bad("size %d needs an L1 table over %d bytes; use larger clusters", o.Size, maxL1Bytes)
	}
	h.l1Size = uint32(l1)
	var ml metaLayout
	ml.l1c = max((int64(l1)*8+cs-1)/cs, 1)
	perBlock := cs * 8 >> h.refcountOrder
	ml.rtc, ml.rbc = 1, 1
	for {
		total := 1 + ml.rtc + ml.rbc + ml.l1c
		rbc := (total + perBlock - 1) / perBlock
		rtc := (rbc*8 + cs - 1) / cs
		if rbc == ml.rbc && rtc == ml.rtc {
			break
		}
		ml.rbc, ml.rtc = rbc, rtc
	}
	h.refTableOffset = uint64(cs)
	h.refTableClusters = uint32(ml.rtc)
	h.l1Offset = uint64(cs * (1 + ml.rtc + ml.rbc))
	if _, err := encodeHeader(h); err != nil {
		return nil, metaLayout{}, err
	}
	return h, ml, nil
}

func writeLayout(f *os.File, h *header, ml metaLayout) error {
	cs := int64(1) << h.clusterBits
	hb, err := encodeHeader(h)
	if err != nil {
		return err
	}
	total := 1 + ml.rtc + ml.rbc + ml.l1c
	perBlock := cs * 8 >> h.refcountOrder
	rt := make([]byte, ml.rtc*cs)
	rb := make([]byte, ml.rbc*cs)
	for i := int64(0); i < ml.rbc; i++ {
		binary.BigEndian.PutUint64(rt[i*8:], uint64((1+ml.rtc+i)*cs))
	}
	for c := int64(0); c < total; c++ {
		blk := rb[(c/perBlock)*cs : (c/perBlock+1)*cs]
		rcSet(blk, c%perBlock, h.refcountOrder, 1)
	}
	w := func(p []byte, off int64) error {
		if _, err := f.WriteAt(p, off); err != nil {
			return fmt.Errorf("qcow2: create: %w", err)
		}
		return nil
	}
	// The L1 table is all zeros: extending the file to its end suffices.
	if err := f.Truncate(total * cs); err != nil {
		return fmt.Errorf("qcow2: create: %w", err)
	}
	return errors.Join(w(rt, cs), w(rb, cs*(1+ml.rtc)), w(hb, 0))
}

// CreateImage creates an image and opens it for writing (the backing file,
// if any, through opts.Backing).
func CreateImage(path string, o CreateOptions, opts Options) (*Image, error) {
	if err := Create(path, o); err != nil {
		return nil, err
	}
	return Open(path, opts)
}
