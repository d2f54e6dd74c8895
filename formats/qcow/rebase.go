package qcow

import (
	"encoding/binary"
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// SetBacking records name as the image's backing file, or none when name
// is "". qcow has no field for the backing file's format, so format is
// not stored. Only the header changes: the caller has already made the
// content what it must be over the new backing file (formats.Rebase).
// The image keeps reading through the backing image it was opened with,
// so Close it next.
//
// The name lives between the 48-byte header and the L1 table, which does
// not move: a name longer than that gap is refused. The offset, size and
// name are written in one write from byte 8 and synced; a name that ends
// within the first 512 bytes makes that a single sector.
func (img *Image) SetBacking(name, format string) error {
	if err := img.checkChangeable(); err != nil {
		return err
	}
	if err := img.CheckBacking(name, format); err != nil {
		return err
	}
	h := img.h
	start := h.nameSlot()
	end := start + uint64(max(len(name), int(h.backingSize)))
	buf := make([]byte, end-8)
	if err := hostfile.ReadFull(img.st, buf, 8); err != nil {
		return fmt.Errorf("qcow: read header: %w", err)
	}
	be := binary.BigEndian
	be.PutUint64(buf[0:], 0)
	be.PutUint32(buf[8:], 0)
	clear(buf[start-8:])
	if name != "" {
		be.PutUint64(buf[0:], start)
		be.PutUint32(buf[8:], uint32(len(name)))
		copy(buf[start-8:], name)
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := hostfile.WriteFull(img.st, buf, 8); err != nil {
		return fmt.Errorf("qcow: write header: %w", err)
	}
	if err := img.st.Sync(); err != nil {
		return err
	}
	h.backingName, h.backingOffset, h.backingSize = name, 0, 0
	if name != "" {
		h.backingOffset, h.backingSize = start, uint32(len(name))
	}
	return nil
}

// MakeEmpty unallocates every cluster, so the whole image reads through
// to its backing file, as qemu-img commit leaves an overlay. The L2
// entries are cleared and synced before any cluster's space is punched.
func (img *Image) MakeEmpty() error {
	if err := img.checkChangeable(); err != nil {
		return err
	}
	n := (img.Size() + img.h.clusterSize - 1) >> img.h.clusterBits
	if err := img.deallocate(0, n); err != nil {
		return err
	}
	return img.barrier()
}

// checkChangeable: open, writable, and not refused for a lying table.
func (img *Image) checkChangeable() error {
	if err := img.checkOpen(); err != nil {
		return err
	}
	if img.ro {
		return image.ErrReadOnly
	}
	return img.brokenErr()
}

// CheckBacking says whether SetBacking(name, format) can be done, before
// a rebase copies anything.
func (img *Image) CheckBacking(name, format string) error {
	h := img.h
	if h.xen != nil {
		return unsupported(48, "xen_header", "a blktap1 image with the XEN extension keeps it where a backing name would go; convert it first")
	}
	if len(name) > maxBackingName {
		return fmt.Errorf("qcow: backing file name of %d bytes (at most %d)", len(name), maxBackingName)
	}
	start := h.nameSlot()
	if start > h.l1Offset || uint64(len(name)) > h.l1Offset-start {
		return unsupported(40, "l1_table_offset", "no room for a %d-byte backing file name: the L1 table starts at %d, %d bytes after where the name goes (convert to a new image instead)",
			len(name), h.l1Offset, h.l1Offset-min(start, h.l1Offset))
	}
	return nil
}

// nameSlot is where the backing name goes: where it is, or right after
// the header.
func (h *header) nameSlot() uint64 {
	if h.backingOffset != 0 {
		return h.backingOffset
	}
	return headerSize
}
