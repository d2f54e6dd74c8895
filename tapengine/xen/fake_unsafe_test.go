package xen

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// mapPages maps pages (indices into fd) in order into one contiguous
// region with prot, as gntdev does with scattered guest frames: reserve
// the range, then place each page over its slot with MAP_FIXED.
func mapPages(fd int, pages []int, prot int) ([]byte, error) {
	size := uintptr(len(pages)) * pageSize
	base, err := unix.MmapPtr(-1, 0, nil, size, unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("reserve: %w", err)
	}
	for i, p := range pages {
		if _, err := unix.MmapPtr(fd, int64(p)*pageSize, unsafe.Add(base, i*pageSize), pageSize,
			prot, unix.MAP_SHARED|unix.MAP_FIXED); err != nil {
			_ = unix.MunmapPtr(base, size)
			return nil, fmt.Errorf("map page %d: %w", p, err)
		}
	}
	return unsafe.Slice((*byte)(base), size), nil
}

func unmapPages(b []byte) error {
	return unix.MunmapPtr(unsafe.Pointer(unsafe.SliceData(b)), uintptr(len(b)))
}
