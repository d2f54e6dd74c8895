package ring

import "unsafe"

// A request's segments are consecutive on the disk; when their pages are
// also consecutive in memory (the local frontend grants a request's pages
// from one run of its memfd; Xen may map neighbours next to each other)
// one system call can move them all: a 512 KiB indirect request is then
// one pread instead of 128.

// extends reports whether b starts in memory right where a ends.
func extends(a, b []byte) bool {
	return len(a) > 0 && len(b) > 0 &&
		uintptr(unsafe.Pointer(unsafe.SliceData(a)))+uintptr(len(a)) == uintptr(unsafe.Pointer(unsafe.SliceData(b)))
}

// join is a followed by b as one slice; only for extends(a, b), whose
// bytes are all mapped (each came from a page the transport mapped).
func join(a, b []byte) []byte {
	return unsafe.Slice(unsafe.SliceData(a), len(a)+len(b))
}
