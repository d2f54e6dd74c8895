package formats

import (
	"strings"

	"github.com/blktap-go/blktap/formats/qcow"
	"github.com/blktap-go/blktap/formats/qcow2"
	"github.com/blktap-go/blktap/formats/vhd"
	"github.com/blktap-go/blktap/formats/vmdk"
)

// QemuDetails is what `qemu-img info` says of an image beyond its name and
// sizes, with qemu's meaning for each field, so `image info --output=json`
// can print the same keys with the same values.
type QemuDetails struct {
	// ClusterSize is qemu's cluster-size: 0 where qemu prints none (raw,
	// fixed VHD, flat VMDK).
	ClusterSize int64
	// Dirty is qemu's dirty-flag, which only qcow2 sets.
	Dirty     bool
	Snapshots []QemuSnapshot
	// Specific is qemu's format-specific, nil where qemu prints none.
	Specific *FormatSpecific
	// ExtentFiles are the image's other files (VMDK extents), whose disk
	// use qemu adds to actual-size.
	ExtentFiles []string
}

// FormatSpecific is qemu's tagged union: {"type": FORMAT, "data": {...}}.
type FormatSpecific struct {
	Type string `json:"type"`
	Data any    `json:"data"`
}

// QemuSnapshot is one entry of qemu-img info's "snapshots".
type QemuSnapshot struct {
	ID          string  `json:"id"`
	Name        string  `json:"name"`
	VMStateSize uint64  `json:"vm-state-size"`
	DateSec     int64   `json:"date-sec"`
	DateNsec    int64   `json:"date-nsec"`
	VMClockSec  uint64  `json:"vm-clock-sec"`
	VMClockNsec uint64  `json:"vm-clock-nsec"`
	ICount      *uint64 `json:"icount,omitempty"` // nil: none recorded, left out as qemu leaves it
}

// qcow2Specific is qemu 7.2's ImageInfoSpecificQCow2; the v3-only keys
// are pointers so a compat=0.10 image omits them as qemu does.
type qcow2Specific struct {
	Compat          string `json:"compat"`
	CompressionType string `json:"compression-type"`
	LazyRefcounts   *bool  `json:"lazy-refcounts,omitempty"`
	RefcountBits    int    `json:"refcount-bits"`
	Corrupt         *bool  `json:"corrupt,omitempty"`
	ExtendedL2      *bool  `json:"extended-l2,omitempty"`
}

type vmdkSpecific struct {
	CID        uint32           `json:"cid"`
	ParentCID  uint32           `json:"parent-cid"`
	CreateType string           `json:"create-type"`
	Extents    []vmdkExtentInfo `json:"extents"`
}

// vmdkExtentInfo is qemu's ImageInfo of one extent, with only the keys
// qemu fills in for extents.
type vmdkExtentInfo struct {
	Compressed  bool   `json:"compressed,omitempty"`
	VirtualSize int64  `json:"virtual-size"`
	Filename    string `json:"filename"`
	ClusterSize int64  `json:"cluster-size,omitempty"`
	Format      string `json:"format"`
}

// QemuName is the name qemu-img gives a format of ours.
func QemuName(format string) string {
	if n, err := Normalize(format); err == nil {
		format = n
	}
	if format == "vhd" {
		return "vpc"
	}
	return format
}

// PathCombine resolves a name stored in the image at path (a backing file,
// a VMDK extent) the way qemu does: relative to the directory part of
// path as written, without cleaning it, so the result matches qemu's
// full-backing-filename byte for byte.
func PathCombine(path, name string) string {
	if strings.HasPrefix(name, "/") {
		return name
	}
	i := strings.LastIndexByte(path, '/')
	if i < 0 {
		return name
	}
	return path[:i+1] + name
}

// DescribeQemu returns qemu-img info's view of an open image opened from
// path.
func DescribeQemu(img Image, path string) QemuDetails {
	var d QemuDetails
	switch i := img.(type) {
	case *qcow2.Image:
		in := i.Info()
		d.ClusterSize, d.Dirty = in.ClusterSize, in.Dirty
		s := qcow2Specific{Compat: in.Compat, CompressionType: in.CompressionType, RefcountBits: in.RefcountBits}
		if in.Version >= 3 {
			lazy, corrupt := in.LazyRefcounts, in.Corrupt
			// Extended L2 entries are refused at open, so an open image
			// never has them.
			ext := false
			s.LazyRefcounts, s.Corrupt, s.ExtendedL2 = &lazy, &corrupt, &ext
		}
		d.Specific = &FormatSpecific{Type: "qcow2", Data: s}
		for _, sn := range in.Snapshots {
			d.Snapshots = append(d.Snapshots, QemuSnapshot{
				ID: sn.ID, Name: sn.Name, VMStateSize: sn.VMStateSize,
				DateSec: sn.Date.Unix(), DateNsec: int64(sn.Date.Nanosecond()),
				VMClockSec: sn.VMClockNanos / 1e9, VMClockNsec: sn.VMClockNanos % 1e9,
				ICount: sn.ICount,
			})
		}
	case *qcow.Image:
		d.ClusterSize = i.Info().ClusterSize
	case *vhd.Image:
		// qemu's cluster-size for VHD is the block size of a dynamic or
		// differencing image; a fixed one has no blocks.
		d.ClusterSize = i.Info().BlockSize
	case *vmdk.Image:
		in := i.Info()
		s := vmdkSpecific{CID: in.CID, ParentCID: in.ParentCID, CreateType: in.CreateType, Extents: []vmdkExtentInfo{}}
		monolithic := in.CreateType == "monolithicSparse" || in.CreateType == "streamOptimized" || in.CreateType == ""
		for n, e := range in.Extents {
			x := vmdkExtentInfo{Compressed: e.Compressed, VirtualSize: e.VirtualSize, ClusterSize: e.GrainSize}
			if monolithic && n == 0 {
				// qemu opens a sparse file with an embedded descriptor as
				// its own extent, with no extent type.
				x.Filename = path
			} else {
				x.Filename, x.Format = PathCombine(path, e.Filename), e.Type
				if x.Filename != path {
					d.ExtentFiles = append(d.ExtentFiles, x.Filename)
				}
			}
			if n == 0 {
				d.ClusterSize = e.GrainSize
			}
			s.Extents = append(s.Extents, x)
		}
		d.Specific = &FormatSpecific{Type: "vmdk", Data: s}
	}
	return d
}
