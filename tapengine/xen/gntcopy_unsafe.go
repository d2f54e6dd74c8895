package xen

import (
	"runtime"
	"unsafe"

	"github.com/blktap-go/blktap/tapengine/ring"
)

// GrantCopy is one IOCTL_GNTDEV_GRANT_COPY for segs. The segment array
// holds buf's address, so buf and the array are pinned for the call.
func (d *sysDevice) GrantCopy(domid uint32, segs []ring.CopySeg, buf []byte, toGuest bool, status []int16) error {
	if d.gnt < 0 {
		return ErrClosed
	}
	arg := make([]byte, sizeGrantCopy)
	if len(segs) == 0 {
		_, err := ioctl(d.gnt, ioctlGntdevGrantCopy, arg)
		return wrapErr("gntdev grant copy", err)
	}
	if err := checkCopy(segs, buf, status); err != nil {
		return err
	}
	var pin runtime.Pinner
	defer pin.Unpin()
	pin.Pin(&buf[0])
	arr := make([]byte, len(segs)*sizeGrantCopySeg)
	pin.Pin(&arr[0])
	addr := uint64(uintptr(unsafe.Pointer(&buf[0])))
	for i, s := range segs {
		encodeCopySeg(arr[i*sizeGrantCopySeg:], domid, s, addr, toGuest)
		addr += uint64(s.Len)
	}
	ne.PutUint32(arg[offCopyCount:], uint32(len(segs)))
	ne.PutUint64(arg[offCopySegs:], uint64(uintptr(unsafe.Pointer(&arr[0]))))
	_, err := ioctl(d.gnt, ioctlGntdevGrantCopy, arg)
	if err != nil {
		return wrapErr("gntdev grant copy", err)
	}
	for i := range segs {
		status[i] = int16(ne.Uint16(arr[i*sizeGrantCopySeg+offCopyStatus:]))
	}
	return nil
}
