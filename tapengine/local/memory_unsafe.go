package local

import (
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// flagPtr points at the u32 flags of ref inside a mapping of the memfd.
// The caller has checked ref against the table size.
func flagPtr(mem []byte, ref uint32) *uint32 {
	off := offFlags + 4*int(ref)
	_ = mem[off+3]
	return (*uint32)(unsafe.Pointer(&mem[off]))
}

func loadFlags(mem []byte, ref uint32) uint32 { return atomic.LoadUint32(flagPtr(mem, ref)) }

func storeFlags(mem []byte, ref uint32, v uint32) { atomic.StoreUint32(flagPtr(mem, ref), v) }

// mapScattered maps the pages refs of fd, in order, into one contiguous
// region (what gntdev does for a multi-page ring): reserve the address
// range, then map each page over its slot with MAP_FIXED.
func mapScattered(fd int, refs []uint32) ([]byte, error) {
	size := uintptr(len(refs)) * pageSize
	base, err := unix.MmapPtr(-1, 0, nil, size, unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("reserve %d bytes: %w", size, err)
	}
	for i, ref := range refs {
		at := unsafe.Add(base, i*pageSize)
		if _, err := unix.MmapPtr(fd, int64(ref)*pageSize, at, pageSize,
			unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_FIXED); err != nil {
			_ = unix.MunmapPtr(base, size)
			return nil, fmt.Errorf("map ref %d: %w", ref, err)
		}
	}
	return unsafe.Slice((*byte)(base), size), nil
}

func unmapScattered(b []byte) error {
	if len(b) == 0 {
		return nil
	}
	return unix.MunmapPtr(unsafe.Pointer(unsafe.SliceData(b)), uintptr(len(b)))
}
