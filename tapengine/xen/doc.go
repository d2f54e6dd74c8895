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
// Grant copy (gntcopy.go). For a ring without persistent grants (the
// frontend did not take them, or the daemon, as it does by default where
// grant copy works, did not offer them: GrantCopyAvailable) the
// transport is a ring.Copier when the kernel has IOCTL_GNTDEV_GRANT_COPY
// (probed once at Attach; without it, ENOTTY, the per-request mappings
// above remain, and the process logs it once): no data page is mapped at
// all. ring.Serve gives each request one buffer; a write's segments are
// copied into it by one ioctl before the image write, a read's copied out
// by one ioctl after the image read, and an indirect request's descriptor
// pages come in by one more. A segment whose status is not GNTST_okay
// fails its request with BLKIF_RSP_ERROR; the ring goes on.
//
// A release point is a moment with no request in flight: ReleasePages,
// and Ack and Notify, which ring.Serve calls only between batches. The
// cache holds DefaultMaxPersistent (1056) grants, as Linux blkback does.
//
// Release before publish. A blkfront without feature-persistent ends
// foreign access on each grant when it sees the response, and finds a
// page still mapped suspicious (Linux logs "backed has not unmapped
// grant" and, since the 2022 grant-table hardening, stops using the
// disk). The Transport is a ring.PageReleaser: ring.Serve calls
// ReleasePages after a batch's I/O and before it publishes the
// responses, so no page of an answered request is mapped by then.
//
// Mapping budget. Each per-request map is a VMA, and a process has
// vm.max_map_count of them, so all transports of a process share a
// budget of a quarter of it, at most 16384 (limit.go). Page never waits
// for it; it returns ring.ErrPagesBusy, the ring releases what it holds
// and waits in ReservePages, holding nothing, so rings cannot deadlock
// on each other.
//
// What has run on a hypervisor (Xen 4.17, PV dom0, Linux 6.1
// xen-blkfront guests, all under QEMU TCG with one vCPU, at commit
// 77cf6bc, before responses were staged and maps budgeted; see
// xen-in-qemu/with-blktap/FINDINGS.md in the shared notes): mapping a
// one-page ring and binding its event channel, persistent grants,
// non-persistent grants (blkfront feature_persistent=0: no
// unmapped-grant complaint, data intact, 42 s for a 32 MiB read against
// 3 to 7 s with persistent grants), indirect descriptors, flush, raw and
// qcow2 images, and a daemon killed and replaced while a guest read (the
// worker kept serving). Not yet run there: multi-page rings (those
// guests chose one page), the x86_32 layout, more than one queue, a
// worker (not daemon) restart resuming a live ring, discard from a
// guest, many rings against the mapping budget, and any of it on real
// hardware with several vCPUs, where races TCG hides could show. Grant
// copy has run there too (Xen 4.17, Linux 6.1 dom0 and guests, the
// harness's grant-perf): 32 MiB written and read back intact by a
// feature_persistent=0 guest, within 2x of a persistent one's time
// (docs/PERFORMANCE.md); its 1 MiB O_DIRECT requests are, as blkfront
// sends them, indirect ones (inferred, not counted); x86_32 not run.
// Since the daemon offers no persistent grants where grant copy works,
// every guest of `make xen-test` but dom0's own attach runs on it.
//
// Events. Reading the evtchn fd yields the u32 local ports that fired;
// each stays masked until its port is written back (Unmask). Ack reads
// them all, then unmasks ours, so a signal that arrives in between is
// held by the hypervisor and fires again at once.
package xen
