package qcow

import (
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
)

// HostExtent says where guest offset off lies in this layer's file (name
// "": the image's own): the file offset and how many bytes from off (at
// most max) follow it contiguously there. ok is false, with n the length
// of that run, where this layer stores nothing plain at off (unallocated
// or compressed clusters). `image map` uses it for qemu-img map's
// "offset".
func (img *Image) HostExtent(off, max int64) (name string, host, n int64, ok bool, err error) {
	if err := img.checkOpen(); err != nil {
		return "", 0, 0, false, err
	}
	if off < 0 || max <= 0 || off >= img.Size() || max > img.Size()-off {
		return "", 0, 0, false, fmt.Errorf("%w: host extent offset %d length %d size %d", image.ErrOutOfRange, off, max, img.Size())
	}
	cs := img.h.clusterSize
	vc, in := off/cs, off%cs
	kind, h, clusters, err := img.resolve(vc, (in+max+cs-1)/cs)
	if err != nil {
		return "", 0, 0, false, err
	}
	n = min(clusters*cs-in, max)
	if kind != runData {
		return "", 0, n, false, nil
	}
	return "", int64(h) + in, n, true, nil
}

// Backing is the open backing image, nil when there is none.
func (img *Image) Backing() image.Image { return img.backing }
