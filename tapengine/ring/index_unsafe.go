package ring

import (
	"sync/atomic"
	"unsafe"
)

// The four ring indices live in memory shared with another domain or
// process, so every access is atomic: Go's atomics are sequentially
// consistent, which gives both the write barrier ring.h wants before a
// producer index is published and the full barrier between publishing
// an index and reading the peer's event index. The header is at the start
// of a page-aligned mapping, so each u32 is 4-byte aligned.

func load32(b []byte, off int) uint32 {
	_ = b[off+3]
	return atomic.LoadUint32((*uint32)(unsafe.Pointer(&b[off])))
}

func store32(b []byte, off int, v uint32) {
	_ = b[off+3]
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&b[off])), v)
}
