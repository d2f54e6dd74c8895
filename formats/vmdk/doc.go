// Package vmdk reads and writes VMware virtual disks (VMDK).
//
// Layouts:
//
//   - monolithicSparse: one sparse extent with the descriptor embedded.
//     Read and write; Create makes it (default).
//   - monolithicFlat: a text descriptor plus a raw "-flat.vmdk" extent.
//     Read and write; Create makes it with Subformat "monolithicFlat".
//   - twoGbMaxExtentSparse / twoGbMaxExtentFlat, vmfs and custom
//     descriptors over SPARSE, FLAT, VMFS and ZERO extents: read and write.
//   - streamOptimized (compressed grains with markers, directory in the
//     header or in the footer): read only; WriteStreamOptimized writes one.
//   - vmfsSparse (COWD), seSparse and raw device maps: refused as
//     image.ErrUnsupported naming the type.
//
// A sparse extent on disk (all fields little-endian, offsets in sectors):
//
//	sector 0        1 .. 20        21           22 ..           n         ...      GrainOffset
//	+--------+----------------+-----+------------------+-----+------------------+--------+---
//	| header | descriptor text| RGD | redundant tables | GD  | grain tables     | (pad)  | grains ...
//	+--------+----------------+-----+------------------+-----+------------------+--------+---
//
// The directory (GD) holds one u32 sector offset per grain table; a grain
// table holds 512 u32 entries, each the sector of one grain (64 KiB by
// default): 0 unallocated (read the parent, else zeros), 1 a zeroed grain
// when the header has flag bit 2. A stream's grain entry points at a
// marker {lba u64, size u32} followed by size bytes of zlib data.
//
// Caller's duties:
//
//  1. Open with Options.Backing set when the image may have a parent
//     (parentFileNameHint): the function resolves and confines the name,
//     limits the chain and refuses loops; the parent is opened read-only.
//  2. Extent files named by a descriptor are opened relative to its
//     directory and may not leave it (absolute names, "..", escaping
//     symlinks) unless Options.AllowUnconfinedExtents says so.
//  3. Call Flush to make writes durable and Close when done (Close
//     flushes). A crash loses at most the writes after the last Flush.
//  4. Do not open the same image writable twice (in this process or any
//     other): grain allocation appends at the end of the file.
//
// Write ordering. A write is acknowledged only when everything it needs
// is in the file, so a process killed right after the acknowledgement
// (the page cache survives it) loses nothing, and a power cut loses
// nothing covered by a completed Flush. A new grain is appended at the
// end of the extent file and written whole (the rest of a partial grain
// copied from the parent), then:
//
//  1. fdatasync (shared by concurrent allocating writers): the grain and
//     the file's new length are durable;
//  2. its grain-table entry is written to the primary, then the redundant
//     table;
//  3. if the table is new (its directory entry was 0: the image had no
//     preallocated table there; it goes at the end of the file like a
//     grain), it is written whole instead, fdatasync, then its directory
//     entries (primary, then redundant).
//
// So a table on disk never points at a grain whose data was not synced
// first, and a directory never names a table that was not; a crash
// between the steps leaves grains or tables that nothing references
// (leaks that Check counts), never metadata pointing at garbage. Writes
// into a grain that is already allocated go in place. Flush is one
// fdatasync (plus the write-back of any table whose earlier write failed).
// Grains are never reused, so a discarded grain (its entry reset to 0, or
// 1 where zeroed grains exist and a parent shows through) cannot be
// overwritten while an old table on disk still names it.
//
// Concurrency: Image is safe for concurrent use. Each sparse extent has a
// mutex over its table cache, allocation cursor and the set of grains
// being allocated; data I/O happens outside it. A writer that finds a grain
// being allocated by another waits for it, so no grain is placed twice.
//
// Untrusted input: every header field is bounded before it sizes an
// allocation (grain at most 64 MiB, 512 entries per table, the directory
// inside the file and at most 2^24 entries, descriptors at most 1 MiB and
// 4096 extents). A writable extent's header, descriptor, directories and
// grain tables may not overlap, and a grain that overlaps any of them is
// neither read nor written. A corrupt image gives a *image.FormatError
// wrapping image.ErrCorrupt, an unsupported feature one wrapping
// image.ErrUnsupported.
package vmdk
