package vmdk

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// CreateOptions describe a new image.
type CreateOptions struct {
	Size int64 // virtual size in bytes, rounded up to 512; 0 with Backing: the parent's size
	// Backing names the parent as it is stored (parentFileNameHint),
	// relative to the new image's directory; a VMDK parent only.
	Backing       string
	BackingFormat string // "" or "vmdk"
	ClusterSize   int64  // grain size in bytes: a power of two, 4 KiB to 64 MiB; 0 = 64 KiB
	Subformat     string // "monolithicSparse" (default) or "monolithicFlat"
	ZeroedGrain   bool   // sparse version 2 with zeroed-grain entries (discard of a child keeps zeros)
	AdapterType   string // ddb.adapterType: ide (default), lsilogic, buslogic, legacyESX

	fs hostfile.FS
}

const (
	defaultGrain = 64 << 10
	embedDescSec = 20 // sectors of embedded descriptor, as qemu writes
)

func randomCID() uint32 {
	var b [4]byte
	rand.Read(b[:])
	v := binary.LittleEndian.Uint32(b[:])
	if v == noParentCID {
		v--
	}
	return v
}

func newDescriptor(createType string, sectors int64, adapter string) *Descriptor {
	cyl := min(sectors/(16*63), 16383)
	return &Descriptor{
		Version: 1, CID: randomCID(), ParentCID: noParentCID, CreateType: createType,
		DDB: map[string]string{
			"ddb.virtualHWVersion":   "4",
			"ddb.geometry.cylinders": strconv.FormatInt(cyl, 10),
			"ddb.geometry.heads":     "16",
			"ddb.geometry.sectors":   "63",
			"ddb.adapterType":        adapter,
		},
	}
}

// closeNew closes a file being created and removes it when *err says the
// create failed (a failed Close fails it too).
func closeNew(fs hostfile.FS, f hostfile.File, path string, err *error) {
	if cerr := f.Close(); *err == nil && cerr != nil {
		*err = createErr("%w", cerr)
	}
	if *err != nil {
		fs.Remove(path)
	}
}

func createErr(format string, args ...any) error {
	return fmt.Errorf("vmdk: create: "+format, args...)
}

// Create makes a new image. It never overwrites (O_EXCL) and returns once
// the image and its directory entry are durable.
func Create(path string, opts CreateOptions) error {
	fs := opts.fs
	if fs == nil {
		fs = hostfile.OSFS{}
	}
	sub := opts.Subformat
	if sub == "" {
		sub = "monolithicSparse"
	}
	if sub != "monolithicSparse" && sub != "monolithicFlat" {
		return createErr("subformat %q: %w (monolithicSparse or monolithicFlat; streamOptimized through WriteStreamOptimized)", sub, image.ErrUnsupported)
	}
	adapter := opts.AdapterType
	if adapter == "" {
		adapter = "ide"
	}
	switch adapter {
	case "ide", "lsilogic", "buslogic", "legacyESX":
	default:
		return createErr("adapter type %q: %w", adapter, image.ErrUnsupported)
	}
	grain := opts.ClusterSize
	if grain == 0 {
		grain = defaultGrain
	}
	if grain < 4096 || grain > maxGrainSectors*sectorSize || grain&(grain-1) != 0 {
		return createErr("grain size %d: %w (a power of two from 4 KiB to 64 MiB)", grain, image.ErrUnsupported)
	}
	size := opts.Size
	var parentCID uint32 = noParentCID
	if opts.Backing != "" {
		if sub != "monolithicSparse" {
			return createErr("a %s image cannot have a parent: %w", sub, image.ErrUnsupported)
		}
		if opts.BackingFormat != "" && opts.BackingFormat != "vmdk" {
			return createErr("parent format %q: %w (a VMDK parent must be a VMDK)", opts.BackingFormat, image.ErrUnsupported)
		}
		if strings.ContainsAny(opts.Backing, "\"\n\r\x00") {
			return createErr("parent name %q holds a quote, newline or NUL", opts.Backing)
		}
		pp := opts.Backing
		if !filepath.IsAbs(pp) {
			pp = filepath.Join(filepath.Dir(path), pp)
		}
		parent, err := Open(pp, Options{ReadOnly: true, fs: opts.fs, skipBacking: true})
		if err != nil {
			return createErr("parent: %w", err)
		}
		if parent.desc != nil {
			parentCID = parent.cid.Load()
		}
		if size == 0 {
			size = parent.Size()
		}
		parent.Close()
	}
	if size <= 0 || size > maxCapacitySects*sectorSize-sectorSize {
		return createErr("size %d", size)
	}
	sectors := (size + sectorSize - 1) / sectorSize
	d := newDescriptor(sub, sectors, adapter)
	d.ParentCID = parentCID
	d.ParentFileNameHint = opts.Backing
	if sub == "monolithicFlat" {
		return createFlat(fs, path, d, sectors)
	}
	return createSparse(fs, path, d, sectors, grain/sectorSize, opts.ZeroedGrain)
}

// sparseLayout places the metadata of a sparse extent the way qemu does:
// header, embedded descriptor, redundant directory and its tables, primary
// directory and its tables, then grains from the next grain boundary.
func sparseLayout(sectors, grainSec int64, descSec uint64, zeroed bool) *sparseHeader {
	h := &sparseHeader{
		Version: 1, Flags: flagNLDetect | flagRedundant,
		Capacity: uint64(sectors), GrainSize: uint64(grainSec), NumGTEsPerGT: 512,
		CompressAlgorithm: 0,
	}
	if zeroed {
		h.Version, h.Flags = 2, h.Flags|flagZeroGrain
	}
	if descSec > 0 {
		h.DescOffset, h.DescSize = 1, descSec
	}
	n := h.gdEntries()
	gdSec := (n*4 + sectorSize - 1) / sectorSize
	h.RGDOffset = 1 + descSec
	h.GDOffset = h.RGDOffset + gdSec + n*h.gtSectors()
	end := h.GDOffset + gdSec + n*h.gtSectors()
	h.GrainOffset = (end + h.GrainSize - 1) / h.GrainSize * h.GrainSize
	return h
}

// dirBytes renders a directory whose tables follow it contiguously.
func dirBytes(h *sparseHeader, at uint64) []byte {
	n := h.gdEntries()
	gdSec := (n*4 + sectorSize - 1) / sectorSize
	b := make([]byte, gdSec*sectorSize)
	for i := uint64(0); i < n; i++ {
		binary.LittleEndian.PutUint32(b[4*i:], uint32(at+gdSec+i*h.gtSectors()))
	}
	return b
}

func createSparse(fs hostfile.FS, path string, d *Descriptor, sectors, grainSec int64, zeroed bool) (err error) {
	h := sparseLayout(sectors, grainSec, embedDescSec, zeroed)
	if n := h.gdEntries(); n > maxGDEntries {
		// Open refuses such a directory (parseSparseHeader): an image
		// made anyway could never be served.
		most := maxGDEntries * uint64(h.NumGTEsPerGT) * h.GrainSize * sectorSize
		return createErr("size %d needs %d grain tables with %d-byte grains; an image opens with at most %d (%d bytes): %w; a larger grain (cluster_size) allows more",
			sectors*sectorSize, n, grainSec*sectorSize, maxGDEntries, most, image.ErrUnsupported)
	}
	if h.GrainOffset > 1<<32-1 {
		return createErr("image too large for 32-bit grain offsets: %w", image.ErrUnsupported)
	}
	d.Extents = []ExtentDesc{{Access: "RW", Sectors: sectors, Type: "SPARSE", File: filepath.Base(path)}}
	desc := d.marshal()
	if len(desc) > embedDescSec*sectorSize {
		return createErr("descriptor of %d bytes does not fit in %d", len(desc), embedDescSec*sectorSize)
	}
	f, err := fs.Open(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return createErr("%w", err)
	}
	defer closeNew(fs, f, path, &err)
	writes := []struct {
		b   []byte
		off uint64
	}{
		{h.marshal(), 0},
		{desc, h.DescOffset},
		{dirBytes(h, h.RGDOffset), h.RGDOffset},
		{dirBytes(h, h.GDOffset), h.GDOffset},
	}
	if err := f.Truncate(int64(h.GrainOffset) * sectorSize); err != nil {
		return createErr("%w", err)
	}
	for _, w := range writes {
		if _, err := f.WriteAt(w.b, int64(w.off)*sectorSize); err != nil {
			return createErr("%w", err)
		}
	}
	if err := f.Sync(); err != nil {
		return createErr("%w", err)
	}
	return fs.SyncDir(filepath.Dir(path))
}

func createFlat(fs hostfile.FS, path string, d *Descriptor, sectors int64) (err error) {
	base := filepath.Base(path)
	flat := strings.TrimSuffix(base, filepath.Ext(base)) + "-flat.vmdk"
	if flat == base {
		return createErr("descriptor name %q collides with its flat extent", base)
	}
	d.Extents = []ExtentDesc{{Access: "RW", Sectors: sectors, Type: "FLAT", File: flat}}
	desc := d.marshal()
	dir := filepath.Dir(path)
	df, err := fs.Open(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return createErr("%w", err)
	}
	var ff hostfile.File
	defer func() {
		for _, f := range []hostfile.File{df, ff} {
			if f == nil {
				continue
			}
			if cerr := f.Close(); err == nil && cerr != nil {
				err = createErr("%w", cerr)
			}
		}
		if err != nil {
			fs.Remove(path)
			if ff != nil {
				fs.Remove(filepath.Join(dir, flat))
			}
		}
	}()
	ff, err = fs.Open(filepath.Join(dir, flat), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		ff = nil
		return createErr("flat extent: %w", err)
	}
	if err := ff.Truncate(sectors * sectorSize); err != nil {
		return createErr("%w", err)
	}
	if _, err := df.WriteAt(desc, 0); err != nil {
		return createErr("%w", err)
	}
	if err := errors.Join(ff.Sync(), df.Sync()); err != nil {
		return createErr("%w", err)
	}
	return fs.SyncDir(dir)
}

// Stream markers (streamOptimized): a metadata marker fills one sector.
//
//	+----------------+------------+------------+---------------------+
//	| val u64        | size u32=0 | type u32   | zero padding to 512 |
//	+----------------+------------+------------+---------------------+
//
// type 0 end of stream, 1 grain table, 2 grain directory, 3 footer; val is
// the sectors of metadata that follow. A grain is {lba u64, size u32}
// followed by size bytes of zlib data, padded to a sector.
const (
	markerEOS    = 0
	markerGT     = 1
	markerGD     = 2
	markerFooter = 3
)
