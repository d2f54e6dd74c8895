package qcow

import (
	"bytes"
	"compress/flate"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// ErrNoBackingOpener: the image names a backing file and Options.Backing is
// nil, so its unallocated clusters cannot be read.
var ErrNoBackingOpener = errors.New("qcow: image has a backing file but Options.Backing is nil")

// DefaultL2CacheTables is the number of L2 tables kept decoded in memory
// when Options.L2CacheTables is 0 (at most 64 KiB each).
const DefaultL2CacheTables = 256

// Options says how to open an image.
type Options struct {
	// ReadOnly opens the file O_RDONLY; writes and discards then fail with
	// image.ErrReadOnly.
	ReadOnly bool
	// Backing opens the backing file the image names (its name as stored,
	// and format "" since qcow v1 cannot record one). The caller resolves
	// relative names and decides what may be opened. nil: an image that
	// needs a backing file fails to open with ErrNoBackingOpener.
	Backing image.OpenFunc
	// L2CacheTables bounds the decoded L2 tables kept in memory
	// (0 = DefaultL2CacheTables).
	L2CacheTables int
	// Logger receives notices (nil = slog.Default()).
	Logger *slog.Logger
}

// Image is an open qcow (v1) image. It implements image.Image and is safe
// for concurrent use.
type Image struct {
	st      hostfile.File
	path    string
	h       *header
	ro      bool
	backing image.Image // nil when the image has none
	log     *slog.Logger
	closed  atomic.Bool

	// mu guards the metadata below. Only metadata I/O (loading an L2
	// table) happens under it, never guest data I/O.
	mu struct {
		sync.Mutex
		l1    []uint64
		l2    map[uint64][]uint64 // decoded L2 tables by file offset
		l2Max int
		eof   int64 // allocation pointer: the next cluster goes at or after it
		// busy marks virtual clusters an allocating write or a discard is
		// changing, and newL2 the L1 indexes whose new L2 table is being
		// written; the channel closes when that operation ends. Whoever
		// meets a mark waits and plans again, so no cluster or table is
		// ever allocated twice, while unrelated allocations overlap.
		busy  map[int64]chan struct{}
		newL2 map[int64]chan struct{}
		// l2offs is every L2 table's offset, sorted (active or claimed).
		l2offs []uint64
		// broken is set when a write would have landed on metadata;
		// every later write and discard fails with it.
		broken error
	}

	// syncer batches the fdatasync barriers of concurrent allocating
	// writes and flushes (group commit).
	syncer hostfile.GroupSync

	// zmu guards the last decompressed cluster.
	zmu   sync.Mutex
	zOff  uint64
	zData []byte
}

var _ image.Image = (*Image)(nil)

// Open opens the qcow image at path.
func Open(path string, opts Options) (*Image, error) {
	return hostfile.OpenWith(path, opts.ReadOnly, "qcow: open", func(f *os.File) (*Image, error) {
		return openStorage(hostfile.OSFile{File: f}, path, opts)
	})
}

// openStorage opens an image on any host file (tests use crashfs ones).
// On error the file is left open for the caller to close.
func openStorage(st hostfile.File, path string, opts Options) (*Image, error) {
	size, err := st.Size()
	if err != nil {
		return nil, fmt.Errorf("qcow: %w", err)
	}
	buf := make([]byte, headerSize+xenHeaderSize)
	n, err := st.ReadAt(buf, 0)
	if err != nil && err != io.EOF {
		return nil, fmt.Errorf("qcow: reading header: %w", err)
	}
	h, err := parseHeader(buf[:n], size, func(p []byte, off int64) error { return hostfile.ReadFull(st, p, off) })
	if err != nil {
		return nil, err
	}
	img := &Image{st: st, path: path, h: h, ro: opts.ReadOnly, log: opts.Logger}
	if img.log == nil {
		img.log = slog.Default()
	}
	img.mu.l2Max = opts.L2CacheTables
	if img.mu.l2Max <= 0 {
		img.mu.l2Max = DefaultL2CacheTables
	}
	img.mu.l2 = make(map[uint64][]uint64)
	img.mu.busy = make(map[int64]chan struct{})
	img.mu.newL2 = make(map[int64]chan struct{})
	img.mu.eof = size
	if img.mu.l1, err = readL1(st, h, size); err != nil {
		return nil, err
	}
	for _, e := range img.mu.l1 {
		if e != 0 {
			img.mu.l2offs = append(img.mu.l2offs, e)
		}
	}
	slices.Sort(img.mu.l2offs)
	for _, e := range img.mu.l2offs {
		if m := img.metaOverlapLocked(e, uint64(h.l2TableBytes)); m != "" && !strings.HasPrefix(m, "L2") {
			return nil, corrupt(int64(h.l1Offset), "l1_table", "L2 table at %#x overlaps the %s", e, m)
		}
	}
	if h.l1LittleEndian {
		img.log.Info("qcow: blktap image with a host-order (little-endian) L1 table; keeping its byte order",
			"path", path)
	}
	if h.backingName != "" {
		if opts.Backing == nil {
			return nil, fmt.Errorf("%w (backing file %q)", ErrNoBackingOpener, h.backingName)
		}
		b, err := opts.Backing(h.backingName, "")
		if err != nil {
			return nil, fmt.Errorf("qcow: opening backing file %q: %w", h.backingName, err)
		}
		img.backing = b
	}
	return img, nil
}

// readL1 loads and validates the L1 table. Its size is bounded by the file
// (checked in parseHeader) and by maxL1Bytes.
func readL1(st hostfile.File, h *header, fileSize int64) ([]uint64, error) {
	raw := make([]byte, h.l1Entries*8)
	if err := hostfile.ReadFull(st, raw, int64(h.l1Offset)); err != nil {
		return nil, fmt.Errorf("qcow: reading L1 table: %w", err)
	}
	order := h.l1Order()
	l1 := make([]uint64, h.l1Entries)
	for i := range l1 {
		e := order.Uint64(raw[i*8:])
		if e != 0 {
			fieldOff := int64(h.l1Offset) + int64(i)*8
			if e&flagCompressed != 0 || e < headerSize || e > uint64(fileSize) ||
				uint64(h.l2TableBytes) > uint64(fileSize)-e {
				return nil, corrupt(fieldOff, fmt.Sprintf("l1[%d]", i),
					"L2 table offset %#x not inside the %d-byte file", e, fileSize)
			}
			if e < h.l1Offset+uint64(len(raw)) && e+uint64(h.l2TableBytes) > h.l1Offset {
				return nil, corrupt(fieldOff, fmt.Sprintf("l1[%d]", i),
					"L2 table at %#x overlaps the L1 table", e)
			}
		}
		l1[i] = e
	}
	// Two L1 entries sharing (or overlapping) an L2 table would let a small
	// file describe an enormous amount of allocated data, and writes
	// through one would change the other: refuse.
	offs := make([]uint64, 0, len(l1))
	for _, e := range l1 {
		if e != 0 {
			offs = append(offs, e)
		}
	}
	slices.Sort(offs)
	for i := 1; i < len(offs); i++ {
		if offs[i] < offs[i-1]+uint64(h.l2TableBytes) {
			return nil, corrupt(int64(h.l1Offset), "l1_table",
				"L2 tables at %#x and %#x overlap (%d-byte tables)", offs[i-1], offs[i], h.l2TableBytes)
		}
	}
	return l1, nil
}

// Size is the virtual size in bytes.
func (img *Image) Size() int64 { return int64(img.h.size) }

// BackingFile returns the backing file name as stored in the image and its
// format ("" always: qcow v1 has no field for it). name is "" if none.
func (img *Image) BackingFile() (name, format string) { return img.h.backingName, "" }

// l2Locked returns the decoded L2 table at off, reading it if needed.
func (img *Image) l2Locked(off uint64) ([]uint64, error) {
	if t, ok := img.mu.l2[off]; ok {
		return t, nil
	}
	raw := make([]byte, img.h.l2TableBytes)
	if err := hostfile.ReadFull(img.st, raw, int64(off)); err != nil {
		return nil, fmt.Errorf("qcow: reading L2 table at %#x: %w", off, err)
	}
	t := make([]uint64, img.h.l2Entries)
	for i := range t {
		t[i] = binary.BigEndian.Uint64(raw[i*8:])
	}
	img.cacheL2Locked(off, t)
	return t, nil
}

func (img *Image) cacheL2Locked(off uint64, t []uint64) {
	for len(img.mu.l2) >= img.mu.l2Max {
		for k := range img.mu.l2 { // map order is random: random eviction
			delete(img.mu.l2, k)
			break
		}
	}
	img.mu.l2[off] = t
}

// entryLocked returns the L2 entry of virtual cluster vc (0 = unallocated).
func (img *Image) entryLocked(vc int64) (uint64, error) {
	l1i := vc >> img.h.l2Bits
	l2off := img.mu.l1[l1i]
	if l2off == 0 {
		return 0, nil
	}
	t, err := img.l2Locked(l2off)
	if err != nil {
		return 0, err
	}
	return t[vc&(img.h.l2Entries-1)], nil
}

// run is a stretch of consecutive virtual clusters read the same way.
type runKind uint8

const (
	runUnalloc    runKind = iota
	runData               // host offsets contiguous
	runCompressed         // exactly one cluster
)

// resolve describes the run starting at virtual cluster vc, at most max
// clusters long.
func (img *Image) resolve(vc, max int64) (kind runKind, host uint64, n int64, err error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	e, err := img.entryLocked(vc)
	if err != nil {
		return 0, 0, 0, err
	}
	switch {
	case e == 0:
		kind = runUnalloc
	case e&flagCompressed != 0:
		return runCompressed, e, 1, nil
	default:
		if e < headerSize || e > maxVirtualSize {
			return 0, 0, 0, corrupt(-1, "l2 entry", "cluster %d maps to host offset %#x", vc, e)
		}
		kind, host = runData, e
	}
	n = 1
	for n < max {
		next, err := img.entryLocked(vc + n)
		if err != nil {
			return 0, 0, 0, err
		}
		if kind == runUnalloc && next != 0 {
			break
		}
		if kind == runData && next != host+uint64(n)*uint64(img.h.clusterSize) {
			break
		}
		n++
	}
	return kind, host, n, nil
}

func (img *Image) checkOpen() error {
	if img.closed.Load() {
		return image.ErrClosed
	}
	return nil
}

// ReadAt reads len(p) bytes at virtual offset off.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	if err := img.checkOpen(); err != nil {
		return 0, err
	}
	if err := image.CheckRange(off, len(p), img.Size()); err != nil {
		return 0, err
	}
	return img.eachRun(off, len(p), "read", func(r span) error {
		dst := p[r.lo:r.hi]
		switch r.kind {
		case runUnalloc:
			return img.readBacking(dst, r.pos)
		case runData:
			return hostfile.ReadZeroed(img.st, dst, int64(r.host)+r.in)
		case runCompressed:
			return img.readCompressed(r.host, dst, r.in)
		}
		return nil
	})
}

// span is one stretch of a request that maps one way: up to n clusters
// in a row of one kind, and the part of the caller's buffer they hold.
type span struct {
	pos    int64 // the virtual offset of the stretch
	vc     int64 // its first virtual cluster
	in     int64 // its offset inside that cluster
	kind   runKind
	host   uint64 // host offset of cluster vc, for runData and runCompressed
	n      int64  // clusters in the run
	lo, hi int    // the buffer's slice [lo, hi)
}

// eachRun cuts [off, off+length) into runs and calls fn on each in order;
// it returns how many bytes were done before the first error, which is
// resolve's own or fn's, the latter naming op and the offset.
func (img *Image) eachRun(off int64, length int, op string, fn func(span) error) (int, error) {
	cs := img.h.clusterSize
	done := 0
	for done < length {
		pos := off + int64(done)
		vc := pos >> img.h.clusterBits
		in := pos & (cs - 1)
		left := int64(length - done)
		kind, host, n, err := img.resolve(vc, (in+left+cs-1)/cs)
		if err != nil {
			return done, err
		}
		m := int(min(n*cs-in, left))
		r := span{pos: pos, vc: vc, in: in, kind: kind, host: host, n: n, lo: done, hi: done + m}
		if err := fn(r); err != nil {
			return done, fmt.Errorf("qcow: %s at %d: %w", op, pos, err)
		}
		done += m
	}
	return length, nil
}

// readBacking fills dst with what the backing image holds at off: zeros
// past its end, or everywhere when there is none.
func (img *Image) readBacking(dst []byte, off int64) error {
	if err := image.ReadBacking(img.backing, dst, off); err != nil {
		return fmt.Errorf("backing file: %w", err)
	}
	return nil
}

// readCompressed copies the compressed cluster's bytes [in, in+len(dst))
// into dst.
func (img *Image) readCompressed(e uint64, dst []byte, in int64) error {
	img.zmu.Lock()
	defer img.zmu.Unlock()
	if img.zData == nil || img.zOff != e {
		data, err := img.decompress(e)
		if err != nil {
			return err
		}
		img.zOff, img.zData = e, data
	}
	copy(dst, img.zData[in:])
	return nil
}

// decompress inflates the compressed cluster described by entry e.
func (img *Image) decompress(e uint64) ([]byte, error) {
	cs := img.h.clusterSize
	hostOff := e & (1<<img.h.compressedShift - 1)
	csize := int64((e >> img.h.compressedShift) & uint64(cs-1))
	if csize == 0 || hostOff < headerSize {
		return nil, corrupt(-1, "l2 entry", "compressed cluster entry %#x: offset %#x length %d", e, hostOff, csize)
	}
	src := make([]byte, csize)
	if err := hostfile.ReadZeroed(img.st, src, int64(hostOff)); err != nil {
		return nil, err
	}
	out := make([]byte, cs)
	fr := flate.NewReader(bytes.NewReader(src))
	defer fr.Close()
	if _, err := io.ReadFull(fr, out); err != nil {
		return nil, corrupt(int64(hostOff), "compressed cluster",
			"deflate data of %d bytes does not inflate to a %d-byte cluster: %v", csize, cs, err)
	}
	return out, nil
}

// Flush makes every completed write durable.
func (img *Image) Flush() error {
	if err := img.checkOpen(); err != nil {
		return err
	}
	if img.ro {
		return nil
	}
	return img.barrier()
}

// barrier returns once an fdatasync that began after the call has ended,
// so every write completed before the call is durable. Concurrent callers
// share one fdatasync.
func (img *Image) barrier() error {
	return img.syncer.Sync(img.st.Sync)
}

// Close flushes and releases the image and its backing image.
func (img *Image) Close() error {
	if img.closed.Swap(true) {
		return image.ErrClosed
	}
	var errs []error
	if !img.ro {
		errs = append(errs, img.barrier())
	}
	if img.backing != nil {
		errs = append(errs, img.backing.Close())
	}
	errs = append(errs, img.st.Close())
	return errors.Join(errs...)
}

// ReadOnly reports whether the image was opened read-only.
func (img *Image) ReadOnly() bool { return img.ro }
