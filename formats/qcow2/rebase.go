package qcow2

import (
	"encoding/binary"
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// SetBacking records name (and its format) as the image's backing file,
// or none when name is "". Only the header changes: the caller has already
// made the content what it must be over the new backing file (see
// formats.Rebase). The image keeps reading through the backing image it
// was opened with, so Close it next; the new name takes effect at the next
// Open.
//
// The first cluster is rebuilt with every extension it holds kept as it
// is (the backing format's replaced) and written in one write, the bytes
// that changed only, then synced. When the name and extensions fit in the
// first 512 bytes, as short names do, that write is a single sector.
func (img *Image) SetBacking(name, format string) error {
	if img.ro {
		return image.ErrReadOnly
	}
	img.io.Lock()
	defer img.io.Unlock()
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.mu.closed {
		return image.ErrClosed
	}
	if img.mu.broken != nil {
		return img.mu.broken
	}
	old, neu, extEnd, err := img.newHeaderLocked(name, format)
	if err != nil {
		return err
	}
	lo, hi := 0, len(old)
	for lo < hi && old[lo] == neu[lo] {
		lo++
	}
	for hi > lo && old[hi-1] == neu[hi-1] {
		hi--
	}
	if lo < hi {
		if err := img.writeMeta(neu[lo:hi], int64(lo), mHeader); err != nil {
			return err
		}
		if err := img.f.Sync(); err != nil {
			return err
		}
	}
	h := img.hdr
	h.backingName, h.backingFormat, h.extensionsEnd = name, format, extEnd
	h.backingOffset = binary.BigEndian.Uint64(neu[8:])
	h.backingSize = binary.BigEndian.Uint32(neu[16:])
	return nil
}

// CheckBacking says whether SetBacking(name, format) can be done (the
// name and extensions fit in the first cluster), before a rebase copies
// anything.
func (img *Image) CheckBacking(name, format string) error {
	img.mu.Lock()
	defer img.mu.Unlock()
	_, _, _, err := img.newHeaderLocked(name, format)
	return err
}

// newHeaderLocked reads the first cluster and returns it with the new
// header laid over a copy, and the new end of the extensions.
func (img *Image) newHeaderLocked(name, format string) (old, neu []byte, extEnd int64, err error) {
	if len(name) > maxBackingName {
		return nil, nil, 0, fmt.Errorf("qcow2: backing file name of %d bytes (at most %d)", len(name), maxBackingName)
	}
	if name == "" && format != "" {
		return nil, nil, 0, fmt.Errorf("qcow2: a backing format without a backing file")
	}
	old = make([]byte, img.cs)
	if err := hostfile.ReadFull(img.f, old, 0); err != nil {
		return nil, nil, 0, fmt.Errorf("qcow2: read header: %w", err)
	}
	neu, extEnd, err = patchBacking(old, img.hdr, name, format)
	return old, neu, extEnd, err
}

// patchBacking returns the first cluster old with the backing name and
// format replaced: the fixed header as it is, the extensions other than
// the backing format's in their order, then the name. Bytes the old
// header used past the new end are zeroed; the rest of the cluster is
// left alone. It also returns the new end of the extensions.
func patchBacking(old []byte, h *header, name, format string) ([]byte, int64, error) {
	be := binary.BigEndian
	cs := len(old)
	hdrLen := int(h.headerLength)
	limit := cs
	if h.backingOffset != 0 && h.backingOffset < uint64(cs) {
		limit = int(h.backingOffset)
	}
	neu := make([]byte, cs)
	copy(neu, old)
	off := hdrLen
	put := func(typ uint32, data []byte) (err error) {
		off, err = putExtension(neu, off, typ, data)
		return err
	}
	if format != "" {
		if err := put(extBackingFmt, []byte(format)); err != nil {
			return nil, 0, err
		}
	}
	// readHeader has walked these records once, so they are in bounds.
	for p := hdrLen; p+8 <= limit; {
		typ, ln := be.Uint32(old[p:]), int(be.Uint32(old[p+4:]))
		if typ == extEnd || p+8+ln > limit {
			break
		}
		if typ != extBackingFmt {
			if err := put(typ, old[p+8:p+8+ln]); err != nil {
				return nil, 0, err
			}
		}
		p += 8 + (ln+7)&^7
	}
	if off+8 > cs {
		return nil, 0, fmt.Errorf("qcow2: header extensions do not fit in one %d-byte cluster", cs)
	}
	clear(neu[off : off+8])
	off += 8
	extEndAt := int64(off)
	be.PutUint64(neu[8:], 0)
	be.PutUint32(neu[16:], 0)
	if name != "" {
		if off+len(name) > cs {
			return nil, 0, fmt.Errorf("qcow2: backing file name does not fit in the first cluster")
		}
		be.PutUint64(neu[8:], uint64(off))
		be.PutUint32(neu[16:], uint32(len(name)))
		copy(neu[off:], name)
		off += len(name)
	}
	oldEnd := max(int(h.extensionsEnd), hdrLen)
	if h.backingOffset != 0 {
		oldEnd = max(oldEnd, int(h.backingOffset)+int(h.backingSize))
	}
	if oldEnd > off {
		clear(neu[off:min(oldEnd, cs)])
	}
	return neu, extEndAt, nil
}

// MakeEmpty unallocates every cluster, so the whole image reads through
// to its backing file, as qemu-img commit leaves an overlay. Each L2
// entry is cleared before the cluster it named is freed (the free waits
// for a sync), so a crash leaves clusters that read their old data or
// the backing file's, never a freed one.
func (img *Image) MakeEmpty() error {
	if img.ro {
		return image.ErrReadOnly
	}
	img.io.Lock()
	defer img.io.Unlock()
	m := &img.mu
	m.Lock()
	defer m.Unlock()
	if m.closed {
		return image.ErrClosed
	}
	if m.broken != nil {
		return m.broken
	}
	if err := img.CanEmpty(); err != nil {
		return err
	}
	nclusters := (img.size + img.cs - 1) >> img.cbits
	per := int64(1) << img.l2bits
	for l1i := range int64(len(m.l1)) {
		if m.l1[l1i]&offsetMask == 0 {
			continue
		}
		for vc := l1i * per; vc < min((l1i+1)*per, nclusters); vc++ {
			e, err := img.entryLocked(vc)
			if err != nil {
				return err
			}
			if e == 0 {
				continue
			}
			if err := img.linkLocked(vc, 0, e); err != nil {
				return err
			}
		}
	}
	return img.applyFreesLocked()
}

// CanEmpty says whether MakeEmpty can be done, before a commit writes
// anything. Clusters shared with an internal snapshot would need their L2
// tables copied first; qemu discards them one by one there, which we have
// no test for, so it is refused.
func (img *Image) CanEmpty() error {
	if len(img.snaps) > 0 {
		return unsupported(60, "nb_snapshots", "emptying an image with internal snapshots is not supported (commit -d keeps it)")
	}
	return nil
}
