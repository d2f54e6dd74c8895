package qcow2

import (
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
)

// HostExtent says where guest offset off lies in this layer's file (name
// "": the image's own, as for every qcow2 without a data file): the
// file offset and how many bytes from off (at most max) follow it
// contiguously there. ok is false, with n the length of that run, where
// this layer stores nothing plain at off (unallocated, zero, compressed).
// `image map` uses it for qemu-img map's "offset".
func (img *Image) HostExtent(off, max int64) (name string, host, n int64, ok bool, err error) {
	if err := image.CheckRange64(off, max, img.size); err != nil {
		return "", 0, 0, false, fmt.Errorf("qcow2: host extent: %w", err)
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.mu.closed {
		return "", 0, 0, false, image.ErrClosed
	}
	// One cluster's segments at a time would do; ask for the whole range
	// so a contiguous run comes back as one segment.
	segs, err := img.segmentsLocked(off, max, nil)
	if err != nil || len(segs) == 0 {
		return "", 0, 0, false, err
	}
	s := segs[0]
	return "", s.host, s.n, s.k == kNormal, nil
}

// Backing is the open backing image, nil when there is none.
func (img *Image) Backing() image.Image { return img.backing }
