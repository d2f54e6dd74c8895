package vhd

import (
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
)

// region is a byte range of the file holding one metadata structure.
type region struct {
	off, n  int64
	what    string
	locator bool
}

// metaRegions lists the metadata of a dynamic or differencing disk: the
// footer copy, the dynamic header, the BAT, the batmap when we keep it
// up to date, and the parent locators stored in the file.
func (img *Image) metaRegions() []region {
	rs := []region{
		{0, footerSize, "footer copy", false},
		{int64(img.foot.DataOffset), headerSize, "dynamic header", false},
		{int64(img.hdr.TableOffset), roundUp(4*int64(img.hdr.MaxEntries), sectorSize), "BAT", false},
	}
	if img.batmap.valid {
		rs = append(rs, region{img.batmap.hdrOff, sectorSize, "batmap header", false},
			region{img.batmap.off, int64(img.batmap.sectors) * sectorSize, "batmap", false})
	}
	for i, l := range img.locators {
		if l.inFile {
			rs = append(rs, region{int64(l.Offset), l.space, fmt.Sprintf("parent locator %d", i), true})
		}
	}
	return rs
}

// checkMetaOverlap refuses a disk whose metadata structures share bytes:
// writing one (a BAT entry, the batmap) would change another, and the
// blocks' own check (clear of all metadata) relies on them being apart.
// A batmap that overlaps is dropped instead, as when qemu's blocks cover
// it: it is an optimisation libvhd can rebuild.
func (img *Image) checkMetaOverlap() error {
	rs := img.metaRegions()
	if img.batmap.valid {
		for _, r := range rs {
			if r.what == "batmap header" || r.what == "batmap" {
				continue
			}
			for _, b := range rs {
				if (b.what == "batmap header" || b.what == "batmap") && overlaps(r, b) {
					img.batmap.valid = false
					img.warn("the batmap overlaps the %s; ignoring the batmap", r.what)
				}
			}
		}
		if !img.batmap.valid {
			rs = img.metaRegions()
		}
	}
	// At most a dozen regions: pairwise is fine. Two locators may name
	// one stored path, so locators are only held apart from the rest.
	for i, a := range rs {
		for _, b := range rs[i+1:] {
			if overlaps(a, b) && !(a.locator && b.locator) {
				return fmtErr(image.ErrCorrupt, b.off, "metadata", "the %s at %d (%d bytes) overlaps the %s at %d (%d bytes)",
					b.what, b.off, b.n, a.what, a.off, a.n)
			}
		}
	}
	return nil
}

func overlaps(a, b region) bool {
	return a.n > 0 && b.n > 0 && a.off < b.off+b.n && b.off < a.off+a.n
}

// refuseMetaWrite is the last check before a block is placed at pos:
// nextFree lies past every structure by construction, so a hit is a bug
// that would otherwise destroy metadata.
func (img *Image) refuseMetaWrite(pos, n int64) error {
	w := region{pos, n, "new block", false}
	for _, r := range img.metaRegions() {
		if overlaps(w, r) {
			return fmtErr(image.ErrCorrupt, pos, "block", "preventing invalid write on metadata: a new block at %d (%d bytes) would overlap the %s at %d", pos, n, r.what, r.off)
		}
	}
	return nil
}
