package vhd

// Naming another parent (`image rebase`, vhd-util modify -p). The parent
// locators' data lives outside the header, in space the header points
// at, and nothing may be placed after the blocks (libvhd and we take
// every byte before the first block for metadata), so the names are
// rewritten in place. The header is the commit point, and no header ever
// points at locator data being rewritten:
//
//  1. header without the pivot locator (the old parent stays named
//     by the others)                                           } fdatasync
//  2. the pivot's new data, in its now unused space             } fdatasync
//  3. header naming the new parent (uuid, time, name), with the
//     pivot alone                                               } fdatasync
//  4. the other locators' new data                              } fdatasync
//  5. header with every locator                                 } fdatasync
//
// A crash leaves the old parent named (by fewer locators at worst) or the
// new one, each with its own uuid, never a mix.

import (
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// rebasePlan is the new parent's footer and name, and each in-file
// locator's new data (by header slot).
type rebasePlan struct {
	par   *parentInfo
	name  []byte
	data  map[int][]byte // padded to the locator's space
	lens  map[int]int
	pivot int
}

// CheckBacking says whether SetBacking(name, format) can be done, before
// a rebase copies anything: a differencing disk, a VHD parent, and new
// names that fit the space the locators have.
func (img *Image) CheckBacking(name, format string) error {
	_, err := img.planRebase(name, format)
	return err
}

func (img *Image) planRebase(name, format string) (*rebasePlan, error) {
	if img.foot.Type != typeDiff {
		return nil, fmt.Errorf("vhd: %s: %w: only a differencing disk has a parent to change", img.path, image.ErrUnsupported)
	}
	if name == "" {
		return nil, fmt.Errorf("vhd: %s: %w: a differencing disk cannot be made standalone here (convert it)", img.path, image.ErrUnsupported)
	}
	if format != "" && format != "vhd" && format != "vpc" {
		return nil, fmt.Errorf("vhd: parent format %q: %w (a VHD's parent must be a VHD)", format, image.ErrUnsupported)
	}
	par, err := openParent(img.path, "dynamic", CreateOptions{Backing: name})
	if err != nil {
		return nil, err
	}
	if par.foot.UUID == img.foot.UUID {
		return nil, fmt.Errorf("vhd: %s cannot be its own parent", img.path)
	}
	if ps, _ := par.foot.virtualSize(); ps != img.size {
		return nil, fmt.Errorf("vhd: %s: %w: the new parent is %d bytes, the disk %d (a differencing disk has its parent's size)", img.path, image.ErrUnsupported, ps, img.size)
	}
	p := &rebasePlan{par: par, data: map[int][]byte{}, lens: map[int]int{}, pivot: -1}
	if p.name = encodeUTF16(name, true); len(p.name) > len(img.hdr.ParentName) {
		return nil, fmt.Errorf("vhd: parent name %q is longer than 256 UTF-16 units", name)
	}
	fresh := map[uint32][]byte{}
	for _, l := range locatorData(img.path, par) {
		fresh[l.code] = l.data
	}
	for i, l := range img.hdr.Locators {
		d, ok := fresh[l.Code]
		if !ok || !img.locatorInFile(l) {
			continue
		}
		if space := locatorSpace(l); int64(len(d)) > space {
			return nil, fmt.Errorf("vhd: %s: %w: the new parent's %s name takes %d bytes; its locator has room for %d",
				img.path, image.ErrUnsupported, platName(l.Code), len(d), space)
		}
		buf := make([]byte, locatorSpace(l))
		copy(buf, d)
		p.data[i], p.lens[i] = buf, len(d)
		if p.pivot < 0 || l.Code == platW2ru {
			p.pivot = i // the relative name survives moving the chain
		}
	}
	if p.pivot < 0 {
		return nil, fmt.Errorf("vhd: %s: %w: no parent locator to rewrite", img.path, image.ErrUnsupported)
	}
	return p, nil
}

// locatorInFile says whether l's data space lies inside the file and
// before the first block could (the checks parseLocators makes).
func (img *Image) locatorInFile(l locator) bool {
	return l.DataOffset%sectorSize == 0 && l.DataOffset >= footerSize && l.DataOffset <= uint64(img.fileSize) &&
		uint64(img.fileSize)-l.DataOffset >= uint64(locatorSpace(l)) && l.DataLength <= 4096
}

// SetBacking names name (a VHD, taken relative to the image's directory)
// as the parent, in the order the file comment gives. Only the header and
// the locators change: the caller has already made the content what it
// must be over the new parent (see formats.Rebase). The image keeps
// reading through the parent it was opened with, so Close it next.
func (img *Image) SetBacking(name, format string) error {
	unlock, err := img.exclusive()
	if err != nil {
		return err
	}
	defer unlock()
	p, err := img.planRebase(name, format)
	if err != nil {
		return err
	}
	h := *img.hdr
	h.Locators[p.pivot] = locator{}
	if err := img.writeHeaderSynced(&h); err != nil {
		return err
	}
	if err := img.writeLocatorsSynced(p, true); err != nil {
		return err
	}
	h.ParentUUID, h.ParentTime = p.par.foot.UUID, vhdTime(p.par.mtime)
	clear(h.ParentName[:])
	copy(h.ParentName[:], p.name)
	var all [8]locator
	for i := range p.data {
		all[i] = img.hdr.Locators[i]
		all[i].DataLength = uint32(p.lens[i])
	}
	h.Locators = [8]locator{}
	h.Locators[p.pivot] = all[p.pivot]
	if err := img.writeHeaderSynced(&h); err != nil {
		return err
	}
	if err := img.writeLocatorsSynced(p, false); err != nil {
		return err
	}
	// A locator we cannot write (another platform) would name the old
	// parent: it is dropped.
	h.Locators = all
	if err := img.writeHeaderSynced(&h); err != nil {
		return err
	}
	img.hdr = &h
	img.parentName, img.parentFormat = name, "vhd"
	return nil
}

// writeLocatorsSynced writes the pivot's new data (pivot) or every other
// locator's, then syncs.
func (img *Image) writeLocatorsSynced(p *rebasePlan, pivot bool) error {
	for i, d := range p.data {
		if (i == p.pivot) != pivot {
			continue
		}
		if err := hostfile.WriteFull(img.f, d, int64(img.hdr.Locators[i].DataOffset)); err != nil {
			return fmt.Errorf("vhd: write parent locator: %w", err)
		}
	}
	return img.f.Sync()
}

// writeHeaderSynced writes the dynamic header h (its checksum computed)
// in one write and syncs.
func (img *Image) writeHeaderSynced(h *header) error {
	b := h.encode()
	if err := hostfile.WriteFull(img.f, b, int64(img.foot.DataOffset)); err != nil {
		return fmt.Errorf("vhd: write header: %w", err)
	}
	copy(h.raw[:], b)
	return img.f.Sync()
}
