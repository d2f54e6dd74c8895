// Package formats opens and creates disk images by format name and guesses
// a file's format from its magic bytes. It is a switch over the format
// packages (formats/raw, ...), with no registry: adding a format is adding
// a case.
//
// Caller's duties:
//
//  1. Name the format explicitly for any image a tenant can write: Probe
//     reads magic bytes, and a guest that writes a qcow2 header into a raw
//     disk must not turn it into a qcow2 image with a backing file of its
//     choosing. Probe is for tools run on trusted files (image info,
//     convert without -f).
//  2. Pass Normalize'd names where they are stored or compared ("aio" and
//     "raw" are one format).
//  3. Pass Options.Backing to allow backing files at all; the function
//     decides which paths may be opened (see image.OpenFunc).
//  4. Close every Image that Open returns.
package formats

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/nbd"
	"github.com/blktap-go/blktap/formats/qcow"
	"github.com/blktap-go/blktap/formats/qcow2"
	"github.com/blktap-go/blktap/formats/ram"
	"github.com/blktap-go/blktap/formats/raw"
	"github.com/blktap-go/blktap/formats/rbd"
	"github.com/blktap-go/blktap/formats/vhd"
	"github.com/blktap-go/blktap/formats/vmdk"
)

// Aliases for callers that import only this package.
type (
	Image       = image.Image
	Extent      = image.Extent
	ExtentKind  = image.ExtentKind
	FormatError = image.FormatError
	OpenFunc    = image.OpenFunc
)

// Extent kinds.
const (
	Data = image.Data
	Zero = image.Zero
	Hole = image.Hole
)

// Error classes (see package image).
var (
	ErrCorrupt     = image.ErrCorrupt
	ErrUnsupported = image.ErrUnsupported
	ErrWrongFormat = image.ErrWrongFormat
	ErrReadOnly    = image.ErrReadOnly
	ErrOutOfRange  = image.ErrOutOfRange
	ErrClosed      = image.ErrClosed
)

// ErrUnknownFormat: a format name that is none of Names (a caller's
// mistake, unlike ErrUnsupported, which is about an image's contents).
var ErrUnknownFormat = errors.New("unknown image format")

// Names lists the canonical format names, in the order error messages
// show them. Aliases: "aio" for raw, "vpc" (qemu-img's name) for vhd.
func Names() []string {
	return []string{"raw", "qcow", "qcow2", "vhd", "vmdk", "ram", "nbd", "rbd"}
}

// Normalize returns the canonical name of a format name or alias.
func Normalize(format string) (string, error) {
	switch format {
	case "raw", "aio":
		return "raw", nil
	case "vhd", "vpc":
		return "vhd", nil
	case "qcow", "qcow2", "vmdk", "ram", "nbd", "rbd":
		return format, nil
	}
	return "", fmt.Errorf("%w %q: valid formats are %s (aliases: aio = raw, vpc = vhd)",
		ErrUnknownFormat, format, strings.Join(Names(), ", "))
}

// Options control Open.
type Options struct {
	// ReadOnly opens the image so that writes, discards and metadata
	// updates are refused with ErrReadOnly.
	ReadOnly bool
	// Backing opens backing files named by the image. Nil refuses every
	// image that has one.
	Backing image.OpenFunc
	// Logger receives what a format reports on its own (an nbd client's
	// reconnects); nil discards it.
	Logger *slog.Logger
	// Scratch: the image is a tool's output, deleted if the tool fails, so
	// writes need no ordering against a machine crash until Flush (qcow2
	// skips its ordering fdatasyncs; Flush and Close still sync).
	Scratch bool
	// URing does a raw image's reads and writes through io_uring where
	// the kernel allows (raw.Options.URing); other formats ignore it.
	URing bool
}

// ErrLocked reports an image another program (qemu, say) holds open for
// writing.
var ErrLocked = qcow2.ErrLocked

// IsFile reports whether images of format live in a file named by a path
// (so paths are checked, locked and confined); ram disks are named, nbd
// images are URIs and rbd images are names in a Ceph pool.
func IsFile(format string) bool {
	name, err := Normalize(format)
	return err == nil && name != "ram" && name != "nbd" && name != "rbd"
}

// CreateOptions control Create.
type CreateOptions struct {
	Size          int64  // virtual size in bytes
	Backing       string // backing file, for formats that have them
	BackingFormat string // its format; "" only where the format allows probing
	ClusterSize   int64  // 0: the format's default
	Subformat     string // "fixed", "monolithicFlat", ...: the format's variant; "" the default
	Compat        string // qcow2: "1.1"/"v3" (default) or "0.10"/"v2"
	LazyRefcounts bool   // qcow2 version 3
	RefcountBits  int    // qcow2; 0 the default (16)
	// CompressionType is qcow2's compression_type: "" or "zlib", "zstd".
	CompressionType string
	ZeroedGrain     bool   // vmdk sparse: zeroed-grain table entries
	AdapterType     string // vmdk: ddb.adapterType; "" ide
	// rbd (ClusterSize is its object size): rbd create's --image-feature,
	// --stripe-unit, --stripe-count and --data-pool.
	Features                []string
	StripeUnit, StripeCount int64
	DataPool                string
	// OpenBacking opens the backing file when Size is 0, to take its
	// size; nil then refuses a zero size.
	OpenBacking image.OpenFunc
}

// Open opens the image at path as format.
func Open(format, path string, opts Options) (Image, error) {
	name, err := Normalize(format)
	if err != nil {
		return nil, err
	}
	switch name {
	case "raw":
		return opened(raw.Open(path, raw.Options{ReadOnly: opts.ReadOnly, URing: opts.URing}))
	case "qcow":
		return opened(qcow.Open(path, qcow.Options{ReadOnly: opts.ReadOnly, Backing: opts.Backing}))
	case "qcow2":
		return opened(qcow2.Open(path, qcow2.Options{ReadOnly: opts.ReadOnly, Backing: opts.Backing, Logger: opts.Logger, Scratch: opts.Scratch}))
	case "vmdk":
		return opened(vmdk.Open(path, vmdk.Options{ReadOnly: opts.ReadOnly, Backing: opts.Backing}))
	case "vhd":
		return opened(vhd.Open(path, vhd.Options{ReadOnly: opts.ReadOnly, Backing: opts.Backing, Logger: opts.Logger}))
	case "ram":
		return opened(ram.OpenParams(path, ram.Options{ReadOnly: opts.ReadOnly}))
	case "nbd":
		return opened(nbd.Open(path, nbd.Options{ReadOnly: opts.ReadOnly, Logger: opts.Logger}))
	case "rbd":
		return rbd.Open(path, rbd.Options{ReadOnly: opts.ReadOnly, Logger: opts.Logger})
	}
	return nil, fmt.Errorf("open %s: %w: format %q is not built in yet", path, ErrUnsupported, name)
}

// opened passes on a format's Open result as an Image; a nil *T on error
// would otherwise become a non-nil Image.
func opened[T Image](img T, err error) (Image, error) {
	if err != nil {
		return nil, err
	}
	return img, nil
}

// Create makes a new image of format at path. It never overwrites: an
// existing path gives an error wrapping fs.ErrExist.
func Create(format, path string, opts CreateOptions) error {
	name, err := Normalize(format)
	if err != nil {
		return err
	}
	if opts.Size < 0 {
		return fmt.Errorf("create %s: negative size %d", path, opts.Size)
	}
	if opts.BackingFormat != "" && opts.Backing == "" {
		return fmt.Errorf("create %s: a backing format without a backing file", path)
	}
	switch name {
	case "raw":
		if opts.Backing != "" {
			return fmt.Errorf("create %s: %w: raw images have no backing file", path, ErrUnsupported)
		}
		if opts.ClusterSize != 0 {
			return fmt.Errorf("create %s: %w: raw images have no cluster size", path, ErrUnsupported)
		}
		return raw.Create(path, opts.Size)
	case "qcow":
		if opts.Subformat != "" {
			return fmt.Errorf("create %s: %w: qcow has no subformats", path, ErrUnsupported)
		}
		return qcow.Create(path, qcow.CreateOptions{
			Size: opts.Size, Backing: opts.Backing, BackingFormat: opts.BackingFormat,
			ClusterSize: opts.ClusterSize, OpenBacking: opts.OpenBacking,
		})
	case "qcow2":
		// compat= is qemu's key; subformat= was ours before it.
		v := opts.Compat
		if v == "" {
			v = opts.Subformat
		} else if opts.Subformat != "" && opts.Subformat != v {
			return fmt.Errorf("create %s: compat=%s and subformat=%s disagree", path, opts.Compat, opts.Subformat)
		}
		compat := ""
		switch v {
		case "", "v3", "1.1":
		case "v2", "0.10":
			compat = "0.10"
		default:
			return fmt.Errorf("create %s: %w: qcow2 compat %q (want v2/0.10 or v3/1.1)", path, ErrUnsupported, v)
		}
		return qcow2.Create(path, qcow2.CreateOptions{
			Size: opts.Size, Backing: opts.Backing, BackingFormat: opts.BackingFormat,
			ClusterSize: opts.ClusterSize, Compat: compat,
			LazyRefcounts: opts.LazyRefcounts, RefcountBits: opts.RefcountBits,
			CompressionType: opts.CompressionType,
		})
	case "vmdk":
		if opts.Subformat == "streamOptimized" {
			return fmt.Errorf("create %s: %w: streamOptimized is written by convert (-O vmdk -o subformat=streamOptimized), not created empty", path, ErrUnsupported)
		}
		return vmdk.Create(path, vmdk.CreateOptions{
			Size: opts.Size, Backing: opts.Backing, BackingFormat: opts.BackingFormat,
			ClusterSize: opts.ClusterSize, Subformat: opts.Subformat,
			ZeroedGrain: opts.ZeroedGrain, AdapterType: opts.AdapterType,
		})
	case "vhd":
		return vhd.Create(path, vhd.CreateOptions{
			Size: opts.Size, Subformat: opts.Subformat, Backing: opts.Backing,
			BackingFormat: opts.BackingFormat, BlockSize: opts.ClusterSize,
		})
	case "ram", "nbd":
		return fmt.Errorf("create %s: %w: format %q has no image file to create", path, ErrUnsupported, name)
	case "rbd":
		if opts.Backing != "" || opts.Subformat != "" {
			return fmt.Errorf("create rbd:%s: %w: rbd images have no backing file or subformat (clone a snapshot for a copy-on-write child)", path, ErrUnsupported)
		}
		return rbd.Create(path, rbd.CreateOptions{
			Size: opts.Size, ObjectSize: opts.ClusterSize, Features: opts.Features,
			StripeUnit: opts.StripeUnit, StripeCount: opts.StripeCount, DataPool: opts.DataPool,
		})
	}
	return fmt.Errorf("create %s: %w: creating format %q is not built in yet", path, ErrUnsupported, name)
}
