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
	return hostfile.OpenWith(path, opts.ReadOnly, "qcow2", func(f *os.File) (*Image, error) {
		if !opts.NoLock {
			if err := lockImage(f, !opts.ReadOnly); err != nil {
				return nil, err
			}
		}
		return openStorage(hostfile.OSFile{File: f}, path, opts)
	})
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

	if err := img.readTables(f, fsize); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
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

// readTables loads the L1 and refcount tables (readHeader bounded both)
// and sets up the maps that index them.
func (img *Image) readTables(f hostfile.File, fsize int64) error {
	h, m := img.hdr, &img.mu
	// L1 table (bounded by readHeader).
	raw := make([]byte, int64(h.l1Size)*8)
	if err := hostfile.ReadFull(f, raw, int64(h.l1Offset)); err != nil {
		return corrupt(int64(h.l1Offset), "l1_table", "unreadable: %v", err)
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
		return corrupt(m.refOff, "refcount_table", "unreadable: %v", err)
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
	return nil
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
func (img *Image) Snapshots() []Snapshot {
	img.mu.Lock()
	defer img.mu.Unlock()
	return append([]Snapshot(nil), img.snaps...)
}

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
		L1Size: h.l1Size, FileSize: img.fileEnd.Load(), Snapshots: append([]Snapshot(nil), img.snaps...),
	}
	if h.version == 3 {
		in.Compat = "1.1"
	}
	in.Dirty = img.mu.dirtySet
	return in
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
