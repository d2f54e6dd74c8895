// Package xen is the ring.Transport of a Xen dom0: the ring worker maps a
// guest's ring and data pages through /dev/xen/gntdev and exchanges
// events with its blkfront through /dev/xen/evtchn. The kernel interface
// sits behind Device, so the transport is tested against a fake and the
// real device (OpenDevice) is a thin layer of ioctls whose numbers and
// layouts abi_test.go checks against the installed uapi headers.
//
// The caller's duties (the worker, given parameters the reconciler read
// from the frontend's xenstore directory):
//
//  1. OpenDevice (one per ring: each ring binds its own port, and Ack
//     consumes every event on the device's fd).
//  2. Attach(dev, Options{Domid, RingRefs, EventChannel,
//     PersistentGrants}): maps ring-ref or ring-ref0..N-1 contiguously
//     (N = 2^ring-page-order, at most 16) and binds event-channel. From
//     here the transport owns dev.
//  3. ring.Serve on the transport, with the protocol the frontend named.
//  4. After Serve returns, Close: it unmaps every page, the ring last,
//     unbinds the port and closes the device. Never Close while Serve
//     runs: its pages would vanish under it.
//
// Grant mappings. gntdev takes the refs first (MAP_GRANT_REF returns an
// offset), and the hypercall happens when that offset is mmapped; the
// mapping is read-only exactly when the mmap is not PROT_WRITE:
//
//	ioctl(gntdev, MAP_GRANT_REF, {count, refs}) -> index
//	mmap(nil, count*4096, prot, MAP_SHARED, gntdev, index)   <- refused refs fail here
//	...
//	munmap(mem); ioctl(gntdev, UNMAP_GRANT_REF, {index, count})
//
// Data pages come in two lifetimes:
//
//	persistent (feature-persistent)        per request (no feature-persistent)
//	+------------------------------+        +-----------------------------------+
//	| first Page(ref): map, cache  |        | Page(ref): map                    |
//	| later Page(ref): cache hit   |        | release point: unmap              |
//	| cache full: per request      |        |                                   |
//	| full and missed: evict LRU   |        |                                   |
//	|   tenth at a release point   |        |                                   |
//	| Close: unmap                 |        | Close: unmap what is left         |
//	+------------------------------+        +-----------------------------------+
//
// A release point is a moment with no request in flight: ReleasePages,
// and Ack and Notify, which ring.Serve calls only between batches. The
// cache holds DefaultMaxPersistent (1056) grants, as Linux blkback does.
//
// Known limit of the current ring.Transport: it has no hook between
// writing a batch's responses and publishing them, so per-request
// mappings outlive the response by one release point. A blkfront without
// feature-persistent ends foreign access when it sees the response and
// finds the page still mapped (Linux logs "backed has not unmapped grant"
// and, since the 2022 grant-table hardening, treats that backend as
// broken). Until the ring calls ReleasePages before PushResponses, serve
// such frontends only with PersistentGrants, which Linux blkfront offers
// by default (since Linux 3.8).
//
// Events. Reading the evtchn fd yields the u32 local ports that fired;
// each stays masked until its port is written back (Unmask). Ack reads
// them all, then unmasks ours, so a signal that arrives in between is
// held by the hypervisor and fires again at once.
package xen
