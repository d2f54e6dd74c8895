package vmdk

import (
	"github.com/blktap-go/blktap/formats/image"
)

// HostExtent says where guest offset off lies: in which file (name as the
// descriptor gives it, "" for the image's own file) at which offset, and
// how many bytes from off (at most max) follow it contiguously there. ok
// is false, with n the length of that run, where nothing is stored plainly
// (unallocated, zeroed or compressed grains, ZERO extents). `image map`
// uses it for qemu-img map's "offset".
func (img *Image) HostExtent(off, max int64) (name string, host, n int64, ok bool, err error) {
	if img.closed.Load() {
		return "", 0, 0, false, image.ErrClosed
	}
	if err := image.CheckRange64(off, max, img.size); err != nil {
		return "", 0, 0, false, err
	}
	for _, e := range img.extents {
		if off < e.start || off >= e.start+e.length {
			continue
		}
		rel, limit := off-e.start, min(max, e.start+e.length-off)
		if img.desc != nil && !embeddedDescriptor(img.desc.CreateType) {
			name = e.d.File
		}
		switch {
		case e.sp != nil:
			gb := e.sp.h.grainBytes()
			g0, in := uint64(rel/gb), rel%gb
			e.sp.mu.Lock()
			defer e.sp.mu.Unlock()
			st, goff, err := e.sp.lookupLocked(g0)
			if err != nil {
				return "", 0, 0, false, err
			}
			n = min(limit, gb-in)
			if st != grainData {
				return name, 0, n, false, nil
			}
			for g := g0 + 1; n < limit; g++ {
				st2, o2, err := e.sp.lookupLocked(g)
				if err != nil || st2 != grainData || o2 != goff+int64(g-g0)*gb {
					break
				}
				n = min(limit, n+gb)
			}
			return name, goff + in, n, true, nil
		case e.f != nil:
			return name, e.off + rel, limit, true, nil
		}
		return name, 0, limit, false, nil
	}
	return "", 0, 0, false, image.ErrOutOfRange
}

// embeddedDescriptor reports whether images of createType keep their
// descriptor inside their one sparse file, which is then the extent.
func embeddedDescriptor(createType string) bool {
	return createType == "monolithicSparse" || createType == "streamOptimized"
}

// Backing is the open parent image, nil when there is none.
func (img *Image) Backing() image.Image { return img.backing }
