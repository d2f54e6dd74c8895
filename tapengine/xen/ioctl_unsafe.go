package xen

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctl issues req on fd with arg as its in/out buffer (a C struct laid
// out by abi.go) and returns the syscall's result: evtchn's bind ioctls
// return the new local port there. arg must not be empty.
func ioctl(fd int, req uintptr, arg []byte) (uintptr, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(&arg[0])))
	if errno != 0 {
		return 0, errno
	}
	return r, nil
}
