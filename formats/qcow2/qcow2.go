package qcow2

import (
	"container/list"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// Options tune Open.
type Options struct {
	// ReadOnly opens the file read-only; writes and discards then fail
	// with image.ErrReadOnly.
	ReadOnly bool
	// Backing opens the backing file the image names (always read-only).
	// Nil: an image that names a backing file fails to open.
	Backing image.OpenFunc
	// L2CacheSize is the number of bytes of L2 tables kept in memory
	// (rounded down to whole tables, at least 4). 0 means 4 MiB, which at
	// 64 KiB clusters maps 32 GiB of disk.
	L2CacheSize int64
	// NoLock skips the qemu-compatible file locks (byte-range OFD locks)
	// that keep qemu and us from opening one image for writing at once.
	NoLock bool
	// Scratch skips the fdatasyncs that order writes against a machine
	// crash (see the package doc); Flush and Close still make everything
	// durable. Only for an image a tool fills and deletes if it fails,
	// such as the target of `image convert`.
	Scratch bool
	// checkOnly: opened by Check, which neither needs the backing file nor
	// wants the automatic repair of a dirty image.
	checkOnly bool
	// Logger receives notes such as an automatic refcount repair. Nil
	// means slog.Default().
	Logger *slog.Logger
}

// Image is an open qcow2 image. It implements image.Image and is safe for
// concurrent use.
type Image struct {
	f        hostfile.File
	path     string
	ro       bool
	scratch  bool
	log      *slog.Logger
	hdr      *header
	cbits    uint32
	cs       int64
	l2bits   uint32 // log2 of entries per L2 table
	rbBits   uint32 // log2 of refcounts per refcount block
	size     int64
	backing  image.Image
	bsize    int64 // backing virtual size
	codec    codec // of compressed clusters, by the header's compression_type
	snaps    []Snapshot
	snapLen  int64
	fileEnd  atomic.Int64 // bytes of the file ever written (grows only)
	poolSize int
	openSize int64 // file length at open

	// checkOnly: opened by Check, which must read a damaged image to
	// report and repair it rather than refuse it.
	checkOnly bool

	gsync hostfile.GroupSync

	// zc caches the last inflated compressed cluster: sequential reads
	// of a compressed image would otherwise inflate it once per request.
	zc struct {
		sync.Mutex
		e    uint64
		data []byte
	}

	// io is held shared by every read and write for its whole duration
	// and exclusively by Discard, Flush and Close: clusters a write stops
	// using are only freed under the exclusive hold, so no read or write
	// still in flight can land in a cluster after it was reused.
	io sync.RWMutex

	mu struct {
		sync.Mutex
		closed      bool
		l1          []uint64
		l2          map[int64]*l2Table
		lru         *list.List // of *l2Table, most recent first
		l2cap       int
		l2misses    int64
		l2set       map[int64]struct{} // host clusters holding active L2 tables
		rbset       map[int64]struct{} // host clusters holding refcount blocks
		refTable    []uint64
		refOff      int64 // current refcount table offset and clusters
		refClus     int64
		blocks      map[int64][]byte // refcount blocks by file offset
		dirtyRB     map[int64]struct{}
		end         int64 // first cluster index past every allocation
		freeHint    int64 // no free cluster below this index
		pool        []poolCluster
		taken       map[int64]bool          // handed out by takeFreeLocked, refcount not yet set
		inflight    map[int64]chan struct{} // guest clusters being allocated
		dirtySet    bool                    // the header's dirty bit is on
		usedRefs    []uint32                // during a repair: true reference counts
		pendingFree []int64                 // host clusters to decref at the next exclusive hold
		broken      error                   // set by markCorruptLocked: every later write fails with it
		// zc is the host cluster compressed clusters are packed into
		// (0: none), zused the bytes of it already given out.
		zc, zused int64
	}
}

type poolCluster struct {
	idx   int64
	fresh bool // never written: reads as zeros without being written
}

type l2Table struct {
	off  int64
	e    []uint64
	elem *list.Element
}

var _ image.Image = (*Image)(nil)

// Open opens the qcow2 image at path.
func Open(path string, opts Options) (*Image, error) {
	flag := os.O_RDWR
	if opts.ReadOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("qcow2: %w", err)
	}
	if !opts.NoLock {
		if err := lockImage(f, !opts.ReadOnly); err != nil {
			f.Close()
			return nil, err
		}
	}
	img, err := openStorage(hostfile.OSFile{File: f}, path, opts)
	if err != nil {
		f.Close()
		return nil, err
	}
	return img, nil
}

func openStorage(f hostfile.File, path string, opts Options) (*Image, error) {
	fsize, err := f.Size()
	if err != nil {
		return nil, fmt.Errorf("qcow2: %s: %w", path, err)
	}
	h, err := readHeader(f, fsize)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if err := h.checkFeatures(opts.ReadOnly || opts.checkOnly); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	img := &Image{
		f: f, path: path, ro: opts.ReadOnly, scratch: opts.Scratch, checkOnly: opts.checkOnly, hdr: h, log: opts.Logger,
		cbits: h.clusterBits, cs: int64(1) << h.clusterBits,
		l2bits: h.clusterBits - 3, rbBits: h.clusterBits + 3 - h.refcountOrder,
		size: int64(h.size),
	}
	if img.log == nil {
		img.log = slog.Default()
	}
	if img.codec, err = codecFor(h.compressionType); err != nil {
		return nil, fmt.Errorf("%s: %w", path, unsupported(104, "compression_type", "%v", err))
	}
	img.fileEnd.Store(fsize)
	img.openSize = fsize
	img.poolSize = int(min(max((1<<20)/img.cs, 4), 64))
	m := &img.mu
	m.dirtySet = h.incompatible&incDirty != 0

	// L1 table (bounded by readHeader).
	raw := make([]byte, int64(h.l1Size)*8)
	if err := hostfile.ReadFull(f, raw, int64(h.l1Offset)); err != nil {
		return nil, fmt.Errorf("%s: %w", path, corrupt(int64(h.l1Offset), "l1_table", "unreadable: %v", err))
	}
	m.l1 = make([]uint64, h.l1Size)
	m.l2set = map[int64]struct{}{}
	for i := range m.l1 {
		e := binary.BigEndian.Uint64(raw[i*8:])
		m.l1[i] = e
		// Only offsets inside the file: the set stays bounded by the
		// file's cluster count whatever the table claims.
		if off := int64(e & offsetMask); off != 0 && off < fsize {
			m.l2set[off>>img.cbits] = struct{}{}
		}
	}
	// Refcount table (bounded by readHeader).
	m.refOff, m.refClus = int64(h.refTableOffset), int64(h.refTableClusters)
	raw = make([]byte, m.refClus*img.cs)
	if err := hostfile.ReadFull(f, raw, m.refOff); err != nil {
		return nil, fmt.Errorf("%s: %w", path, corrupt(m.refOff, "refcount_table", "unreadable: %v", err))
	}
	m.refTable = make([]uint64, len(raw)/8)
	for i := range m.refTable {
		m.refTable[i] = binary.BigEndian.Uint64(raw[i*8:])
	}
	m.rbset = map[int64]struct{}{}
	for _, e := range m.refTable {
		if off := int64(e & offsetMask); off != 0 && off < fsize {
			m.rbset[off>>img.cbits] = struct{}{}
		}
	}
	m.blocks = map[int64][]byte{}
	m.dirtyRB = map[int64]struct{}{}
	m.inflight = map[int64]chan struct{}{}
	m.taken = map[int64]bool{}
	if h.nbSnapshots > 0 {
		img.snaps, img.snapLen, err = readSnapshots(f, h.snapshotsOffset, h.nbSnapshots, fsize, img.cs)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	}
	if err := img.checkLayoutLocked(); err != nil && !img.ro && !opts.checkOnly {
		err = img.markCorruptLocked(-1, "metadata", "%v", err)
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	m.end = (fsize + img.cs - 1) >> img.cbits
	m.l2 = map[int64]*l2Table{}
	m.lru = list.New()
	cache := opts.L2CacheSize
	if cache <= 0 {
		cache = 4 << 20
	}
	m.l2cap = int(max(cache/img.cs, 4))

	if h.backingName != "" && !opts.checkOnly {
		if opts.Backing == nil {
			return nil, fmt.Errorf("%s: %w", path, unsupported(int64(h.backingOffset), "backing_file",
				"image has backing file %q but no backing opener was given (Options.Backing)", h.backingName))
		}
		b, err := opts.Backing(h.backingName, h.backingFormat)
		if err != nil {
			return nil, fmt.Errorf("qcow2: %s: open backing file %q: %w", path, h.backingName, err)
		}
		img.backing, img.bsize = b, b.Size()
	}

	if !img.ro && !opts.checkOnly {
		if err := img.prepareWritable(); err != nil {
			img.closeBacking()
			return nil, fmt.Errorf("%s: %w", path, err)
		}
	}
	return img, nil
}

// prepareWritable clears autoclear bits we do not maintain and repairs the
// refcounts of an image left dirty by a crash.
func (img *Image) prepareWritable() error {
	h := img.hdr
	if h.version == 3 && h.autoclear != 0 {
		var z [8]byte
		if _, err := img.f.WriteAt(z[:], 88); err != nil {
			return fmt.Errorf("qcow2: clear autoclear features: %w", err)
		}
		h.autoclear = 0
		if err := img.f.Sync(); err != nil {
			return err
		}
	}
	if img.mu.dirtySet {
		img.log.Info("qcow2: image was not closed cleanly; rebuilding refcounts", "path", img.path)
		res, err := img.check(RepairAll)
		if err != nil {
			return err
		}
		if res.Corruptions > res.CorruptionsFixed {
			return corrupt(-1, "refcounts", "dirty image could not be repaired: %v", res.Problems)
		}
		// The dirty bit stays: it is cleared at our clean close.
	}
	return nil
}

// Size is the virtual size in bytes.
func (img *Image) Size() int64 { return img.size }

// BackingFile returns the backing file name and format as stored in the
// image ("" when there is none).
func (img *Image) BackingFile() (name, format string) {
	return img.hdr.backingName, img.hdr.backingFormat
}

// Snapshots lists the internal snapshots (read from the table only).
func (img *Image) Snapshots() []Snapshot { return append([]Snapshot(nil), img.snaps...) }

// Info describes an image for `image info`.
type Info struct {
	Format          string     `json:"format"`
	VirtualSize     int64      `json:"virtual_size"`
	ClusterSize     int64      `json:"cluster_size"`
	Version         int        `json:"version"`
	Compat          string     `json:"compat"`
	BackingFile     string     `json:"backing_file,omitempty"`
	BackingFormat   string     `json:"backing_format,omitempty"`
	RefcountBits    int        `json:"refcount_bits"`
	CompressionType string     `json:"compression_type"`
	LazyRefcounts   bool       `json:"lazy_refcounts"`
	Dirty           bool       `json:"dirty"`
	Corrupt         bool       `json:"corrupt"`
	Incompatible    uint64     `json:"incompatible_features"`
	Compatible      uint64     `json:"compatible_features"`
	Autoclear       uint64     `json:"autoclear_features"`
	L1Size          uint32     `json:"l1_size"`
	FileSize        int64      `json:"file_size"`
	Snapshots       []Snapshot `json:"snapshots,omitempty"`
}

// Info reports what `image info` prints.
func (img *Image) Info() Info {
	img.mu.Lock()
	defer img.mu.Unlock()
	h := img.hdr
	in := Info{
		Format: "qcow2", VirtualSize: img.size, ClusterSize: img.cs, Version: int(h.version),
		Compat: "0.10", BackingFile: h.backingName, BackingFormat: h.backingFormat,
		RefcountBits: 1 << h.refcountOrder, CompressionType: img.codec.name(),
		LazyRefcounts: h.compatible&compatLazyRefcounts != 0,
		Corrupt:       h.incompatible&incCorrupt != 0,
		Incompatible:  h.incompatible, Compatible: h.compatible, Autoclear: h.autoclear,
		L1Size: h.l1Size, FileSize: img.fileEnd.Load(), Snapshots: img.Snapshots(),
	}
	if h.version == 3 {
		in.Compat = "1.1"
	}
	in.Dirty = img.mu.dirtySet
	return in
}

// ---- L1/L2 lookup ----------------------------------------------------------

// l2Locked returns the L2 table at off, reading it on a cache miss.
func (img *Image) l2Locked(off int64) (*l2Table, error) {
	m := &img.mu
	if t, ok := m.l2[off]; ok {
		m.lru.MoveToFront(t.elem)
		return t, nil
	}
	if off%img.cs != 0 || off < img.cs {
		return nil, corrupt(off, "l2_table", "L2 table offset %#x is not a cluster-aligned offset past the header", off)
	}
	if fe := img.fileEnd.Load(); off+img.cs > fe {
		return nil, corrupt(off, "l2_table", "L2 table at %#x ends past the end of the file (%d)", off, fe)
	}
	m.l2misses++
	raw := make([]byte, img.cs)
	if err := hostfile.ReadFull(img.f, raw, off); err != nil {
		return nil, fmt.Errorf("qcow2: read L2 table at %#x: %w", off, err)
	}
	t := &l2Table{off: off, e: make([]uint64, img.cs/8)}
	for i := range t.e {
		t.e[i] = binary.BigEndian.Uint64(raw[i*8:])
	}
	img.cacheL2Locked(t)
	return t, nil
}

func (img *Image) cacheL2Locked(t *l2Table) {
	m := &img.mu
	t.elem = m.lru.PushFront(t)
	m.l2[t.off] = t
	for m.lru.Len() > m.l2cap {
		old := m.lru.Remove(m.lru.Back()).(*l2Table)
		delete(m.l2, old.off)
	}
}

// l1Reserved are the L1 entry bits that must be zero.
const l1Reserved = uint64(0x7f000000000001ff)

// entryLocked returns the L2 entry of guest cluster vc (0 if no L2 table).
func (img *Image) entryLocked(vc int64) (uint64, error) {
	l1i := vc >> img.l2bits
	if l1i >= int64(len(img.mu.l1)) {
		return 0, corrupt(-1, "l1_table", "guest cluster %d is past the L1 table", vc)
	}
	l1e := img.mu.l1[l1i]
	if l1e&l1Reserved != 0 {
		return 0, corrupt(int64(img.hdr.l1Offset)+l1i*8, "l1_entry", "L1 entry %d (%#x) has reserved bits set", l1i, l1e)
	}
	off := int64(l1e & offsetMask)
	if off == 0 {
		return 0, nil
	}
	t, err := img.l2Locked(off)
	if err != nil {
		return 0, err
	}
	return t.e[vc&(1<<img.l2bits-1)], nil
}

// cluster kinds an L2 entry can describe.
type kind uint8

const (
	kUnalloc kind = iota
	kZero
	kNormal
	kCompressed
)

// classify decodes an L2 entry, validating it.
func (img *Image) classify(e uint64, vc int64) (kind, int64, error) {
	if e&entryCompressed != 0 {
		return kCompressed, 0, nil
	}
	off := int64(e & offsetMask)
	if e&0x3f000000000001fe != 0 {
		return 0, 0, corrupt(-1, "l2_entry", "guest cluster %d: L2 entry %#x has reserved bits set", vc, e)
	}
	if off != 0 && off&(img.cs-1) != 0 {
		return 0, 0, corrupt(-1, "l2_entry", "guest cluster %d: data offset %#x is not cluster-aligned", vc, off)
	}
	if e&entryZero != 0 {
		return kZero, off, nil
	}
	if off == 0 {
		return kUnalloc, 0, nil
	}
	if img.metaAtLocked(off >> img.cbits) {
		return 0, 0, corrupt(off, "l2_entry", "guest cluster %d: data cluster %#x overlaps the %v", vc, off, img.overlapLocked(off, img.cs, 0))
	}
	return kNormal, off, nil
}

// compressed descriptor: x = 62 - (cluster_bits - 8) low bits of host
// offset, then the count of additional 512-byte sectors up to bit 61.
func (img *Image) compressedSpan(e uint64) (off, n int64) {
	x := 62 - (img.cbits - 8)
	off = int64(e & (uint64(1)<<x - 1))
	sectors := int64((e>>x)&(uint64(1)<<(62-x)-1)) + 1
	return off, sectors*512 - off&511
}

// readCompressed inflates the compressed cluster e into dst (cluster-sized).
func (img *Image) readCompressed(e uint64, dst []byte) error {
	off, n := img.compressedSpan(e)
	fe := img.fileEnd.Load()
	if off >= fe || off < img.cs {
		return corrupt(off, "l2_entry", "compressed cluster at %#x is outside the file", off)
	}
	n = min(n, fe-off)
	buf := make([]byte, n) // n <= 2^(62-x) sectors <= 2 clusters + 512
	if err := hostfile.ReadFull(img.f, buf, off); err != nil {
		return fmt.Errorf("qcow2: read compressed cluster at %#x: %w", off, err)
	}
	if err := img.codec.decompress(dst, buf); err != nil {
		return corrupt(off, "compressed_cluster", "compressed cluster at %#x does not %s-decompress to %d bytes: %v", off, img.codec.name(), len(dst), err)
	}
	return nil
}

// ---- reads -----------------------------------------------------------------

type segment struct {
	k    kind
	v    int64  // guest offset
	n    int64  // length
	host int64  // kNormal: host offset of v
	e    uint64 // kCompressed: the entry
}

// segmentsLocked maps [off, off+n) to runs of one kind, merging runs that
// are contiguous on the host.
func (img *Image) segmentsLocked(off, n int64, out []segment) ([]segment, error) {
	for n > 0 {
		vc := off >> img.cbits
		in := off & (img.cs - 1)
		l := min(n, img.cs-in)
		e, err := img.entryLocked(vc)
		if err != nil {
			return out, err
		}
		k, host, err := img.classify(e, vc)
		if err != nil {
			return out, err
		}
		s := segment{k: k, v: off, n: l}
		switch k {
		case kNormal:
			s.host = host + in
		case kCompressed:
			s.e = e
		}
		if last := len(out) - 1; last >= 0 && out[last].k == k && k != kCompressed &&
			(k != kNormal || out[last].host+out[last].n == s.host) {
			out[last].n += l
		} else {
			out = append(out, s)
		}
		off += l
		n -= l
	}
	return out, nil
}

// ReadAt reads len(p) bytes at guest offset off.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if err := image.CheckRange(off, len(p), img.size); err != nil {
		return 0, err
	}
	img.io.RLock()
	defer img.io.RUnlock()
	img.mu.Lock()
	if img.mu.closed {
		img.mu.Unlock()
		return 0, image.ErrClosed
	}
	var arr [8]segment
	segs, err := img.segmentsLocked(off, int64(len(p)), arr[:0])
	img.mu.Unlock()
	if err != nil {
		return 0, err
	}
	for _, s := range segs {
		dst := p[s.v-off : s.v-off+s.n]
		if err := img.readSegment(s, dst); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

func (img *Image) readSegment(s segment, dst []byte) error {
	switch s.k {
	case kNormal:
		if err := hostfile.ReadZeroed(img.f, dst, s.host); err != nil {
			return fmt.Errorf("qcow2: read data at %#x: %w", s.host, err)
		}
	case kZero:
		clear(dst)
	case kUnalloc:
		return img.readBacking(dst, s.v)
	case kCompressed:
		img.zc.Lock()
		defer img.zc.Unlock()
		if img.zc.data == nil || img.zc.e != s.e {
			if img.zc.data == nil {
				img.zc.data = make([]byte, img.cs)
			}
			img.zc.e = 0
			if err := img.readCompressed(s.e, img.zc.data); err != nil {
				return err
			}
			img.zc.e = s.e
		}
		copy(dst, img.zc.data[s.v&(img.cs-1):])
	}
	return nil
}

// readBacking reads guest range [v, v+len(dst)) from the backing image;
// past its end (or without one) the range reads as zeros.
func (img *Image) readBacking(dst []byte, v int64) error {
	if err := image.ReadBacking(img.backing, dst, v); err != nil {
		return fmt.Errorf("qcow2: read backing file at %d: %w", v, err)
	}
	return nil
}

// ---- Map -------------------------------------------------------------------

// Map describes [off, off+length) as extents; unallocated runs are asked
// of the backing image with Depth+1.
func (img *Image) Map(off, length int64) ([]image.Extent, error) {
	if err := image.CheckRange64(off, length, img.size); err != nil {
		return nil, fmt.Errorf("qcow2: map: %w", err)
	}
	var out []image.Extent
	add := func(x image.Extent) {
		if x.Length == 0 {
			return
		}
		if l := len(out) - 1; l >= 0 && out[l].Kind == x.Kind && out[l].Depth == x.Depth && out[l].Offset+out[l].Length == x.Offset {
			out[l].Length += x.Length
			return
		}
		out = append(out, x)
	}
	const chunk = 64 << 20 // bound the segment list per lock hold
	for pos := off; pos < off+length; {
		n := min(chunk, off+length-pos)
		img.mu.Lock()
		if img.mu.closed {
			img.mu.Unlock()
			return nil, image.ErrClosed
		}
		segs, err := img.segmentsLocked(pos, n, nil)
		img.mu.Unlock()
		if err != nil {
			return nil, err
		}
		for _, s := range segs {
			switch s.k {
			case kNormal, kCompressed:
				add(image.Extent{Offset: s.v, Length: s.n, Kind: image.Data})
			case kZero:
				add(image.Extent{Offset: s.v, Length: s.n, Kind: image.Zero})
			case kUnalloc:
				if img.backing == nil {
					add(image.Extent{Offset: s.v, Length: s.n, Kind: image.Hole})
					continue
				}
				in := max(min(s.n, img.bsize-s.v), 0)
				if in > 0 {
					bx, err := img.backing.Map(s.v, in)
					if err != nil {
						return nil, fmt.Errorf("qcow2: map backing file: %w", err)
					}
					for _, x := range bx {
						x.Depth++
						add(x)
					}
				}
				add(image.Extent{Offset: s.v + in, Length: s.n - in, Kind: image.Hole, Depth: 1})
			}
		}
		pos += n
	}
	return out, nil
}

// ---- Flush / Close ---------------------------------------------------------

// Flush makes every write completed before the call durable. Metadata is
// written through as it changes, so one fdatasync covers data, L2 tables,
// refcount blocks and tables alike; the ordering that matters for a crash
// was already enforced when each was written (see the package doc).
func (img *Image) Flush() error {
	img.io.Lock()
	img.mu.Lock()
	if img.mu.closed {
		img.mu.Unlock()
		img.io.Unlock()
		return image.ErrClosed
	}
	err := img.applyFreesLocked()
	img.mu.Unlock()
	img.io.Unlock()
	if err != nil {
		return err
	}
	if img.ro {
		return nil
	}
	return img.f.Sync()
}

// Close flushes, returns unused reserved clusters, clears the dirty bit
// and releases the file and the backing image.
func (img *Image) Close() error {
	// The exclusive hold waits for every read and write in flight.
	img.io.Lock()
	defer img.io.Unlock()
	img.mu.Lock()
	if img.mu.closed {
		img.mu.Unlock()
		return image.ErrClosed
	}
	img.mu.closed = true
	var errs []error
	if !img.ro && img.mu.broken != nil {
		// Only make what was acknowledged durable; touch no metadata.
		errs = append(errs, img.f.Sync())
	} else if !img.ro {
		errs = append(errs, img.applyFreesLocked(), img.releasePoolLocked(), img.writeRefblocksLocked(), img.f.Sync())
		// Trim only once every entry that stopped naming the clusters
		// past the new end is durable.
		if errors.Join(errs...) == nil {
			errs = append(errs, img.trimLocked(), img.f.Sync())
		}
		if img.mu.dirtySet && errors.Join(errs...) == nil {
			errs = append(errs, img.setDirtyLocked(false))
		}
	}
	img.mu.Unlock()
	errs = append(errs, img.f.Close())
	img.closeBacking()
	return errors.Join(errs...)
}

func (img *Image) closeBacking() {
	if img.backing != nil {
		if err := img.backing.Close(); err != nil {
			img.log.Warn("qcow2: close backing file", "path", img.path, "err", err)
		}
	}
}
