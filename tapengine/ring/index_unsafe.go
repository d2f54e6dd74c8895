package ring

import (
	"sync/atomic"
	"unsafe"
)

// The four ring indices live in memory shared with another domain or
// process, so every access is atomic: Go's atomics are sequentially
// consistent (see store32 for the one caveat), which gives both the write barrier ring.h wants before a
// producer index is published and the full barrier between publishing
// an index and reading the peer's event index. The header is at the start
// of a page-aligned mapping, so each u32 is 4-byte aligned.

func load32(b []byte, off int) uint32 {
	_ = b[off+3]
	return atomic.LoadUint32((*uint32)(unsafe.Pointer(&b[off])))
}

// store32 is an exchange, not a store: publishing an index and then
// reading the peer's event index needs a full barrier between the two.
// A Go atomic store gives one on amd64 (XCHG) but not under the race
// detector, which runs it as a release store (a plain MOV), so a store
// could pass the following load and both sides sleep (TestEndToEnd in
// tapengine/frontend hung that way; TestIndexStoreLoadOrder shows it).
// An exchange is a full barrier everywhere and costs the same XCHG.
func store32(b []byte, off int, v uint32) {
	_ = b[off+3]
	atomic.SwapUint32((*uint32)(unsafe.Pointer(&b[off])), v)
}
