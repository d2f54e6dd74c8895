// Package qcow2 reads and writes QEMU qcow2 images (versions 2 and 3) as
// an image.Image: copy-on-write over a backing image, zero clusters,
// compressed clusters (zlib; written by WriteCompressed for convert -c),
// discard, lazy refcounts with the dirty bit, internal snapshots (listed,
// created, applied and deleted: snapshot_ops.go), and a check that finds
// leaks and corruptions the way `qemu-img check` does.
//
// Refused with image.ErrUnsupported naming the feature: encryption (AES,
// LUKS), external data files, extended L2 entries (subclusters),
// compression_type zstd, unknown incompatible feature bits. A file that is
// not qcow2 is image.ErrWrongFormat; inconsistent metadata is
// image.ErrCorrupt, always as an *image.FormatError giving the field and
// file offset.
//
// # Using it
//
//  1. Open with Options.Backing set if the image may name a backing file;
//     the opener (not this package) confines and resolves the name, limits
//     chain depth and refuses loops. The name and format are passed on
//     exactly as stored (BackingFile returns them).
//  2. Read, write, discard and map from any number of goroutines.
//  3. Call Flush whenever the data written so far must survive a crash.
//  4. Call Close: it flushes, returns reserved clusters, clears the dirty
//     bit (lazy refcounts) and closes the backing image. Without Close the
//     image is valid but may hold leaked clusters (Check repairs them).
//
// # On disk (big-endian)
//
//	cluster 0   +----------------------------------------------+
//	            | header (72 B v2, 104+ B v3) | extensions |   |
//	            | backing file name                            |
//	            +----------------------------------------------+
//	L1 table    | u64 per 2^(2*cluster_bits-3) bytes of disk:  |
//	            | bit 63 copied | bits 9-55 L2 table offset    |
//	L2 table    | u64 per guest cluster:                       |
//	            | 63 copied | 62 compressed | 9-55 offset | 0 zero |
//	            | compressed: low x bits offset, then 512-B    |
//	            | sector count - 1, x = 62-(cluster_bits-8)    |
//	refcount    | table of u64 block offsets; blocks of        |
//	            | 2^refcount_order-bit counts, one per cluster |
//	            +----------------------------------------------+
//
// # Crash consistency: the write order
//
// Every metadata change is written (pwrite) before the call that made it
// returns, so a process crash loses nothing the page cache holds. For a
// machine crash the rule is: whatever a pointer names is durable before
// the pointer is written, and a reference is dropped only after the
// pointer that held it. Concretely:
//
//  1. Clusters are reserved in small batches: refcounts set to 1, the
//     refcount blocks written, the file extended over the batch (so no
//     entry can ever point past its end), fdatasync. A crash leaks at
//     most one batch, never corrupts (with lazy refcounts the dirty bit, set and
//     synced before the first allocation, replaces this sync, and the
//     refcounts are rebuilt when a dirty image is opened for writing).
//  2. Data goes into a reserved cluster. If the cluster's old guest
//     content is not all zeros (a backing file, a shared or compressed
//     cluster) or the host cluster may hold stale bytes, fdatasync follows,
//     so the L2 entry never names a cluster whose content is unwritten.
//  3. The L2 entry is written. A new L2 table is written (and synced if it
//     has entries or may be stale) before its L1 entry.
//  4. References an entry stops holding (discarded, rewritten shared or
//     compressed clusters, a copied L2 table) are dropped at the next
//     Discard, Flush or Close: fdatasync first, so no lowered refcount is
//     ever durable while a durable entry still counts on it, then the
//     refcount blocks are written. A freed cluster is reused only through
//     step 1.
//  5. A new refcount block is written and synced before the refcount
//     table entry naming it; a grown refcount table (and its blocks) is
//     written and synced before the header points to it, then the old
//     table is freed.
//
// Flush is one fdatasync (two when references were dropped, step 4): the
// ordering above already holds, so data, L2 tables, refcount blocks and
// tables become durable together. Options.Scratch drops the ordering
// syncs for images a tool fills and deletes on failure (convert).
//
// The crash test writes through a file that keeps the synced state plus a
// random subset of later writes, and checks the result with Check and
// qemu-img check.
//
// # Integrity
//
// A refcount or table that lies about the layout must not turn a write
// into the destruction of metadata. Before every metadata write, before a
// cluster is handed out (a free refcount on a cluster holding metadata is
// such a lie) and before data goes into a new cluster, the target is
// compared with the header, active L1 and L2 tables, refcount table and
// blocks, snapshot table and snapshot L1 tables, all known in memory
// (qemu's default "cached" overlap checks); an open for writing refuses
// those structures overlapping one another. A hit refuses the write, sets
// the corrupt bit (incompatible feature bit 1, version 3) and syncs it,
// and fails every later write and discard of the Image with an error
// naming `blktap image check --repair`; Flush and Close still make what
// was acknowledged durable. A marked image opens read-only only; Check
// clears the bit when its repair leaves the image clean.
//
// # Locking
//
// Open and Check take the byte-range locks qemu takes (open file
// description locks on bytes 100+perm and 200+perm), so qemu and we never
// write one image at once: a writer excludes every other opener, readers
// coexist. A conflict is ErrLocked. Options.NoLock opts out.
//
// # Concurrency
//
// One mutex (Image.mu) guards all metadata; data I/O runs outside it. A
// guest cluster being allocated is marked in flight, so a second writer to
// it waits and then writes into the first one's cluster: no double
// allocation. Discard, Flush and Close hold Image.io exclusively, reads
// and writes share it, so a cluster is never reused under a request that
// still addresses it.
package qcow2
