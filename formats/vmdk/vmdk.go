package vmdk

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"sync/atomic"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// Options tune Open.
type Options struct {
	ReadOnly bool
	// Backing opens the parent named by parentFileNameHint, passed as
	// stored (relative names are relative to the child's directory) with
	// format "vmdk"; the function resolves and confines the name. nil: an
	// image with a parent fails to open with a clear error.
	Backing image.OpenFunc
	// AllowUnconfinedExtents lets a descriptor name extent files by
	// absolute path or outside its own directory. Off by default: a
	// tenant's descriptor naming /etc/shadow must never be served.
	AllowUnconfinedExtents bool
	// GTCache is the number of grain tables cached per sparse extent
	// (2 KiB each at the default 512 entries); 0 means 1024 (32 GiB of
	// disk at 64 KiB grains).
	GTCache int

	fs          hostfile.FS // tests substitute crashfs
	skipBacking bool        // Create reads a parent's CID and size only
}

// createTypes are the descriptor create types we open; each maps to
// whether we support it.
var createTypes = map[string]bool{
	"monolithicSparse":            true,
	"monolithicFlat":              true,
	"streamOptimized":             true,
	"twoGbMaxExtentSparse":        true,
	"twoGbMaxExtentFlat":          true,
	"vmfs":                        true,
	"vmfsPreallocated":            true,
	"vmfsEagerZeroedThick":        true,
	"vmfsThin":                    true,
	"custom":                      true,
	"vmfsSparse":                  false,
	"seSparse":                    false,
	"vmfsRaw":                     false,
	"vmfsRawDeviceMap":            false,
	"vmfsPassthroughRawDeviceMap": false,
	"fullDevice":                  false,
	"partitionedDevice":           false,
}

// extent is one extent line, opened.
type extent struct {
	d      ExtentDesc
	start  int64 // virtual byte offset of the extent
	length int64
	f      hostfile.File // FLAT/VMFS data file, or the sparse extent's file
	off    int64         // FLAT: byte offset of the extent in f
	sp     *sparse       // SPARSE
}

// Image is an open VMDK image. It implements image.Image and is safe for
// concurrent use.
type Image struct {
	path     string
	desc     *Descriptor // nil for a bare sparse extent without descriptor
	extents  []*extent
	files    []hostfile.File // every file we opened, closed once
	size     int64
	readOnly bool
	backing  image.Image
	closed   atomic.Bool

	// The descriptor's place, for the CID change on first write.
	descFile hostfile.File
	descOff  int64
	descCap  int64 // bytes available (embedded); -1: a file of its own
	descText []byte
	cidOnce  sync.Once
	cidErr   error
	cidDirty atomic.Bool
	cid      atomic.Uint32 // the descriptor's CID, changed by the first write
}

var _ image.Image = (*Image)(nil)

// Detect reports whether the first bytes of a file look like a VMDK: a
// sparse extent's magic, an old COWD extent's (which Open then refuses by
// name), or a text descriptor.
func Detect(header []byte) bool {
	if len(header) >= 4 && (string(header[:4]) == magicSparse || string(header[:4]) == magicCOWD) {
		return true
	}
	return looksLikeDescriptor(header)
}

func looksLikeDescriptor(b []byte) bool {
	b = b[:min(len(b), 512)]
	if bytes.HasPrefix(b, []byte("# Disk DescriptorFile")) {
		return true
	}
	// Some writers put other comments first: accept text that names a
	// createType within its first sector.
	for _, c := range b {
		if c == 0 {
			break
		}
		if c < 0x20 && c != '\n' && c != '\r' && c != '\t' {
			return false
		}
	}
	return bytes.Contains(b, []byte("\ncreateType=")) || bytes.HasPrefix(b, []byte("createType="))
}

// Open opens a VMDK: a sparse extent (with or without embedded descriptor)
// or a descriptor file naming its extents.
func Open(path string, opts Options) (*Image, error) {
	fs := opts.fs
	if fs == nil {
		fs = hostfile.OSFS{}
	}
	flag := os.O_RDWR
	if opts.ReadOnly {
		flag = os.O_RDONLY
	}
	f, err := fs.Open(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("vmdk: open: %w", err)
	}
	img := &Image{path: path, readOnly: opts.ReadOnly, files: []hostfile.File{f}}
	if err := img.open(f, fs, opts); err != nil {
		img.closeFiles()
		return nil, err
	}
	return img, nil
}

func (img *Image) open(f hostfile.File, fs hostfile.FS, opts Options) error {
	head := make([]byte, sectorSize)
	n, err := f.ReadAt(head, 0)
	if n == 0 && err != nil && err != io.EOF {
		return fmt.Errorf("vmdk: %s: %w", img.path, err)
	}
	head = head[:n]
	cacheCap := opts.GTCache
	if cacheCap <= 0 {
		cacheCap = defaultGTCache
	}
	switch {
	case n >= 4 && (string(head[:4]) == magicSparse || string(head[:4]) == magicCOWD):
		return img.openSparseFile(f, opts, cacheCap)
	case looksLikeDescriptor(head):
		size, err := f.Size()
		if err != nil {
			return fmt.Errorf("vmdk: %s: %w", img.path, err)
		}
		if size > maxDescriptor {
			return fmtErr(0, "descriptor", image.ErrCorrupt, "descriptor file of %d bytes (limit %d)", size, maxDescriptor)
		}
		text := make([]byte, size)
		if err := hostfile.ReadFull(f, text, 0); err != nil {
			return fmtErr(0, "descriptor", image.ErrCorrupt, "%v", err)
		}
		d, err := ParseDescriptor(text)
		if err != nil {
			return err
		}
		if err := checkCreateType(d.CreateType); err != nil {
			return err
		}
		img.desc = d
		img.cid.Store(d.CID)
		img.descFile, img.descCap, img.descText = f, -1, text
		if err := img.openExtents(fs, opts, cacheCap); err != nil {
			return err
		}
		return img.openBacking(opts)
	}
	return fmtErr(0, "magic", image.ErrWrongFormat, "%s: neither a sparse extent nor a descriptor", img.path)
}

// openSparseFile opens an image that starts as a sparse extent: bare, or
// monolithicSparse with its descriptor embedded (naming itself alone).
func (img *Image) openSparseFile(f hostfile.File, opts Options, cacheCap int) error {
	sp, err := openSparse(f, img.path, opts.ReadOnly, cacheCap)
	if err != nil {
		return err
	}
	h := sp.h
	if h.DescOffset == 0 {
		img.extents = []*extent{{d: ExtentDesc{Access: "RW", Sectors: int64(h.Capacity), Type: "SPARSE", File: filepath.Base(img.path)},
			length: int64(h.Capacity) * sectorSize, f: f, sp: sp}}
		img.size = int64(h.Capacity) * sectorSize
		return img.openBacking(opts)
	}
	dsize, _ := f.Size()
	off := int64(h.DescOffset) * sectorSize
	if off >= dsize {
		return fmtErr(28, "desc_offset", image.ErrCorrupt, "descriptor at sector %d past the end of the file", h.DescOffset)
	}
	text := make([]byte, min(int64(h.DescSize)*sectorSize, dsize-off))
	if err := hostfile.ReadFull(f, text, off); err != nil {
		return fmtErr(off, "descriptor", image.ErrCorrupt, "%v", err)
	}
	d, err := ParseDescriptor(text)
	if err != nil {
		return err
	}
	if len(d.Extents) != 1 || d.Extents[0].Type != "SPARSE" {
		return fmtErr(off, "descriptor", image.ErrCorrupt, "an embedded descriptor must name exactly one SPARSE extent (itself)")
	}
	img.desc = d
	img.cid.Store(d.CID)
	if i := bytes.IndexByte(text, 0); i >= 0 {
		text = text[:i]
	}
	img.descFile, img.descOff, img.descCap, img.descText = f, off, int64(h.DescSize)*sectorSize, text
	if err := checkCreateType(d.CreateType); err != nil {
		return err
	}
	e := &extent{d: d.Extents[0], length: d.Extents[0].Sectors * sectorSize, f: f, sp: sp}
	if uint64(e.d.Sectors) > h.Capacity {
		return descErr(e.d.Line, image.ErrCorrupt, "extent of %d sectors exceeds its header's capacity %d", e.d.Sectors, h.Capacity)
	}
	img.extents = []*extent{e}
	img.size = e.length
	return img.openBacking(opts)
}

func checkCreateType(t string) error {
	ok, known := createTypes[t]
	if !known {
		return fmtErr(-1, "createType", image.ErrUnsupported, "unknown create type %q", t)
	}
	if !ok {
		return fmtErr(-1, "createType", image.ErrUnsupported, "create type %q", t)
	}
	return nil
}

func (img *Image) openExtents(fs hostfile.FS, opts Options, cacheCap int) error {
	dir := filepath.Dir(img.path)
	flag := os.O_RDWR
	if opts.ReadOnly {
		flag = os.O_RDONLY
	}
	var start int64
	for _, d := range img.desc.Extents {
		e := &extent{d: d, start: start, length: d.Sectors * sectorSize}
		switch d.Type {
		case "ZERO":
		case "FLAT", "VMFS", "SPARSE":
			fl := flag
			if d.Access != "RW" {
				fl = os.O_RDONLY
			}
			f, err := fs.OpenIn(dir, d.File, fl, 0, !opts.AllowUnconfinedExtents)
			if err != nil {
				if errors.Is(err, hostfile.ErrEscape) {
					return descErr(d.Line, image.ErrUnsupported, "extent file %q: %v (Options.AllowUnconfinedExtents)", d.File, err)
				}
				return fmt.Errorf("vmdk: %s: descriptor line %d: extent %q: %w", img.path, d.Line, d.File, err)
			}
			img.files = append(img.files, f)
			e.f = f
			if d.Type == "SPARSE" {
				sp, err := openSparse(f, d.File, opts.ReadOnly || d.Access != "RW", cacheCap)
				if err != nil {
					return fmt.Errorf("vmdk: %s: descriptor line %d: %w", img.path, d.Line, err)
				}
				if uint64(d.Sectors) > sp.h.Capacity {
					return descErr(d.Line, image.ErrCorrupt, "extent of %d sectors exceeds its header's capacity %d", d.Sectors, sp.h.Capacity)
				}
				e.sp = sp
			} else {
				e.off = d.Offset * sectorSize
			}
		default:
			return descErr(d.Line, image.ErrUnsupported, "%s extents", d.Type)
		}
		if d.Access != "RW" && d.Access != "RDONLY" {
			return descErr(d.Line, image.ErrUnsupported, "%s extents", d.Access)
		}
		img.extents = append(img.extents, e)
		start += e.length
	}
	img.size = start
	return nil
}

func (img *Image) openBacking(opts Options) error {
	if img.desc == nil || img.desc.ParentFileNameHint == "" || opts.skipBacking {
		return nil
	}
	if opts.Backing == nil {
		return fmtErr(-1, "parentFileNameHint", image.ErrUnsupported,
			"image has parent %q but no backing opener was given", img.desc.ParentFileNameHint)
	}
	b, err := opts.Backing(img.desc.ParentFileNameHint, "vmdk")
	if err != nil {
		return fmt.Errorf("vmdk: %s: parent %q: %w", img.path, img.desc.ParentFileNameHint, err)
	}
	img.backing = b
	return nil
}

func (img *Image) closeFiles() {
	for _, f := range img.files {
		f.Close()
	}
	img.files = nil
	if img.backing != nil {
		img.backing.Close()
	}
}

// Size is the virtual size in bytes.
func (img *Image) Size() int64 { return img.size }

// BackingFile returns the parent name as stored (parentFileNameHint) and
// "vmdk" when there is one.
func (img *Image) BackingFile() (name, format string) {
	if img.desc == nil || img.desc.ParentFileNameHint == "" {
		return "", ""
	}
	return img.desc.ParentFileNameHint, "vmdk"
}

// each calls fn for every extent piece of [off, off+n): the extent, the
// offset within it, and the slice range [a, b) of the request.
func (img *Image) each(off, n int64, fn func(e *extent, rel, a, b int64) error) error {
	for _, e := range img.extents {
		if e.start+e.length <= off || e.start >= off+n {
			continue
		}
		lo := max(off, e.start)
		hi := min(off+n, e.start+e.length)
		if err := fn(e, lo-e.start, lo-off, hi-off); err != nil {
			return err
		}
	}
	return nil
}

// eachGrain splits [rel, rel+n) of a sparse extent into grain pieces.
func eachGrain(sp *sparse, rel, n int64, fn func(g uint64, in, a, b int64) error) error {
	gb := sp.h.grainBytes()
	for done := int64(0); done < n; {
		x := rel + done
		g, in := uint64(x/gb), x%gb
		k := min(gb-in, n-done)
		if err := fn(g, in, done, done+k); err != nil {
			return err
		}
		done += k
	}
	return nil
}

// ReadAt reads from the image; unallocated grains read from the parent
// (zeros past its end) or as zeros.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if img.closed.Load() {
		return 0, image.ErrClosed
	}
	if err := image.CheckRange(off, len(p), img.size); err != nil {
		return 0, err
	}
	err := img.each(off, int64(len(p)), func(e *extent, rel, a, b int64) error {
		q := p[a:b]
		switch {
		case e.sp != nil:
			return eachGrain(e.sp, rel, int64(len(q)), func(g uint64, in, x, y int64) error {
				ok, err := e.sp.readGrain(q[x:y], g, in)
				if err == nil && !ok {
					err = img.readParent(q[x:y], e.start+rel+x)
				}
				return err
			})
		case e.f != nil:
			n, err := e.f.ReadAt(q, e.off+rel)
			if n < len(q) {
				if err != nil && err != io.EOF {
					return fmt.Errorf("vmdk: read %s: %w", e.d.File, err)
				}
				clear(q[n:]) // a flat file shorter than its extent reads as zeros
			}
			return nil
		default:
			clear(q)
			return nil
		}
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// readParent fills p with the parent's bytes at off, zeros past its end.
func (img *Image) readParent(p []byte, off int64) error {
	if err := image.ReadBacking(img.backing, p, off); err != nil {
		return fmt.Errorf("vmdk: read parent: %w", err)
	}
	return nil
}

// Map describes [off, off+length) as extents: allocated grains and flat
// extents are data, zeroed grains and ZERO extents zero, unallocated grains
// the parent's map at Depth+1 (a hole at depth 0 without parent).
func (img *Image) Map(off, length int64) ([]image.Extent, error) {
	if img.closed.Load() {
		return nil, image.ErrClosed
	}
	if err := image.CheckRange64(off, length, img.size); err != nil {
		return nil, err
	}
	var out []image.Extent
	add := func(x image.Extent) { out = image.AppendExtent(out, x) }
	var holeStart, holeLen int64 // a pending run of unallocated grains
	flushHole := func() error {
		if holeLen == 0 {
			return nil
		}
		err := img.mapUnallocated(holeStart, holeLen, add)
		holeLen = 0
		return err
	}
	err := img.each(off, length, func(e *extent, rel, a, b int64) error {
		vo := off + a
		switch {
		case e.sp != nil:
			return e.sp.scan(rel, b-a, func(x, y int64, st grainState) error {
				if st == grainUnalloc {
					if holeLen == 0 {
						holeStart = vo + x
					}
					holeLen += y - x
					return nil
				}
				if err := flushHole(); err != nil {
					return err
				}
				k := image.Data
				if st == grainZero {
					k = image.Zero
				}
				add(image.Extent{Offset: vo + x, Length: y - x, Kind: k})
				return nil
			})
		case e.f != nil:
			if err := flushHole(); err != nil {
				return err
			}
			mapFlat(e.f, e.off+rel, b-a, func(o, n int64, k image.ExtentKind) {
				add(image.Extent{Offset: vo + o, Length: n, Kind: k})
			})
		default:
			if err := flushHole(); err != nil {
				return err
			}
			add(image.Extent{Offset: vo, Length: b - a, Kind: image.Zero})
		}
		return nil
	})
	if err == nil {
		err = flushHole()
	}
	return out, err
}

// mapUnallocated reports a run of unallocated grains: a hole without a
// parent, else the parent's extents one level deeper and a hole past the
// parent's end.
func (img *Image) mapUnallocated(start, n int64, add func(image.Extent)) error {
	if img.backing == nil {
		add(image.Extent{Offset: start, Length: n, Kind: image.Hole})
		return nil
	}
	bs := img.backing.Size()
	if start < bs {
		sub, err := img.backing.Map(start, min(n, bs-start))
		if err != nil {
			return fmt.Errorf("vmdk: map parent: %w", err)
		}
		for _, x := range sub {
			x.Depth++
			add(x)
		}
	}
	if end := start + n; end > bs {
		s := max(start, bs)
		add(image.Extent{Offset: s, Length: end - s, Kind: image.Hole, Depth: 1})
	}
	return nil
}

// Flush makes every completed write durable: an fdatasync per extent
// file (the grain tables were written with the writes that needed them).
func (img *Image) Flush() error {
	if img.closed.Load() {
		return image.ErrClosed
	}
	return img.flush()
}

func (img *Image) flush() error {
	if img.readOnly {
		return nil
	}
	var errs []error
	if img.descCap < 0 && img.cidDirty.Swap(false) {
		errs = append(errs, img.descFile.Sync())
	}
	for _, e := range img.extents {
		switch {
		case e.sp != nil:
			if !e.sp.readOnly {
				errs = append(errs, e.sp.flush())
			}
		case e.f != nil && e.d.Access == "RW":
			errs = append(errs, e.f.Sync())
		}
	}
	return errors.Join(errs...)
}

// Close flushes and releases the image and its parent.
func (img *Image) Close() error {
	if !img.closed.CompareAndSwap(false, true) {
		return image.ErrClosed
	}
	err := img.flush()
	if err == nil && !img.readOnly {
		for _, e := range img.extents {
			if e.sp != nil && !e.sp.readOnly {
				err = errors.Join(err, e.sp.trim())
			}
		}
	}
	img.closeFiles()
	return err
}

var cidLine = regexp.MustCompile(`(?m)^([ \t]*CID[ \t]*=[ \t]*)[0-9a-fA-F]+`)

// touchCID gives the image a new content ID before its first change, as
// VMware and qemu do, so children made from it can tell it changed. The
// new text has the same length when the old CID had 8 digits.
func (img *Image) touchCID() error {
	img.cidOnce.Do(func() {
		if img.descFile == nil || !cidLine.Match(img.descText) {
			return
		}
		cid := randomCID()
		text := cidLine.ReplaceAll(img.descText, []byte(fmt.Sprintf("${1}%08x", cid)))
		if img.descCap >= 0 && int64(len(text)) > img.descCap {
			return
		}
		out := text
		if img.descCap >= 0 && int64(len(text)) < img.descCap {
			out = append(text, 0) // the embedded text ends at a NUL
		}
		if _, err := img.descFile.WriteAt(out, img.descOff); err != nil {
			img.cidErr = fmt.Errorf("vmdk: update CID: %w", err)
			return
		}
		if img.descCap < 0 && len(text) < len(img.descText) {
			if err := img.descFile.Truncate(int64(len(text))); err != nil {
				img.cidErr = fmt.Errorf("vmdk: update CID: %w", err)
				return
			}
		}
		img.cid.Store(cid)
		img.descText = text
		img.cidDirty.Store(true)
	})
	return img.cidErr
}
