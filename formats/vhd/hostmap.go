package vhd

import (
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
)

// HostExtent says where guest offset off lies in the VHD file (name "":
// always the image's own): the file
// offset and how many bytes from off (at most max) follow it contiguously
// there. ok is false, with n the length of that run, where this layer
// holds no data (an unallocated block, or a sector whose bitmap bit is
// clear). `image map` uses it for qemu-img map's "offset".
func (img *Image) HostExtent(off, max int64) (name string, host, n int64, ok bool, err error) {
	if err := img.enter(); err != nil {
		return "", 0, 0, false, err
	}
	defer img.leave()
	if err := image.CheckRange64(off, max, img.size); err != nil {
		return "", 0, 0, false, fmt.Errorf("vhd: host extent: %w", err)
	}
	if img.hdr == nil {
		return "", off, max, true, nil
	}
	blk, in := off/img.blockSize, off%img.blockSize
	limit := min(max, img.blockSize-in)
	e, bm, err := img.lookup(blk)
	if err != nil {
		return "", 0, 0, false, err
	}
	if e == batUnused {
		return "", 0, limit, false, nil
	}
	s := in / sectorSize
	set := img.bitTest(bm, s)
	r := (s + 1) * sectorSize
	for r < in+limit && img.bitTest(bm, r/sectorSize) == set {
		r += sectorSize
	}
	n = min(r, in+limit) - in
	return "", img.dataOff(e) + in, n, set, nil
}

// Backing is the open parent image, nil when there is none.
func (img *Image) Backing() image.Image { return img.parent }
