// Package qcow reads and writes QEMU's original copy-on-write format,
// qcow version 1, as the 2006 blktap toolkit served it: standalone sparse
// images and copy-on-write overlays over a backing image of any format.
//
// # On-disk layout (all fields big-endian)
//
//	 0                   4                   8
//	+-------------------+-------------------+
//	| magic "QFI\xfb"   | version = 1       |
//	+-------------------+-------------------+ 8
//	| backing_file_offset (u64)             |
//	+-------------------+-------------------+ 16
//	| backing_file_size | mtime             |
//	+-------------------+-------------------+ 24
//	| size: virtual size in bytes (u64)     |
//	+----+----+---------+-------------------+ 32
//	|cb  |l2b | pad     | crypt_method      |
//	+----+----+---------+-------------------+ 40
//	| l1_table_offset (u64)                 |
//	+---------------------------------------+ 48
//	| [blktap: "XEN\xfb" cksum min_alloc flags]  (only with no backing file
//	|  and a 4096-aligned L1; flag 2 clear = L1 stored little-endian)
//	| backing file name (not NUL-terminated) |
//	| L1: ceil(size / 2^(cb+l2b)) u64 L2 table offsets, 0 = none
//	| L2 tables (2^l2b u64) and clusters (2^cb bytes), appended at EOF
//
//	L2 entry: 0 = unallocated (read the backing image, else zeros)
//	          bit 63 clear: file offset of the cluster
//	          bit 63 set: compressed; bits 62..63-cb = byte length,
//	                      low 63-cb bits = file offset; raw deflate
//
// qcow v1 has no refcounts: space is allocated by appending at the end of
// the file and is never reused, so a crash can leak space (Check reports
// it) but never make two entries share a cluster.
//
// # Caller's duties
//
//  1. Open with Options.Backing set when the image may name a backing file:
//     the function receives the name as stored, resolves relative names
//     against the image's directory, refuses paths outside the allowed
//     directories, limits chain depth and loops, and returns a read-only
//     image. (qcow v1 cannot record the backing format, so the opener is
//     always called with format "" and must probe safely.)
//  2. Use the Image from any number of goroutines; Flush when writes must
//     be durable; Close once (it flushes and closes the backing image).
//  3. Never let another program write the file while it is open.
//
// # Write ordering (why a crash leaves a valid image)
//
// A write to an allocated cluster goes in place, under no lock. A write
// that needs new clusters (unallocated, or compressed ones, which are never
// rewritten in place) takes the allocation path:
//
//  1. Under the metadata mutex, claim space at the end of the file (new L2
//     tables where the L1 entry is 0, one cluster per virtual cluster) and
//     mark those virtual clusters and L1 indexes busy. A writer or discard
//     that meets a busy mark waits for it and plans again, so no cluster
//     or L2 table is ever allocated twice; unrelated allocations overlap.
//  2. Write the clusters, each filled from the old contents (the backing
//     image or the decompressed cluster) where the write does not cover
//     it, and the new L2 tables with their entries.
//  3. fdatasync: from here on everything referenced below is durable.
//     Concurrent allocating writes and Flush calls share one fdatasync
//     (group commit): each waits for a sync that began after its call.
//  4. Write the entries in existing L2 tables, then the L1 entries of the
//     new tables. Each is a naturally aligned 8-byte write, so a crash
//     leaves each entry either old or new; both are valid.
//  5. Update the in-memory tables and drop the busy marks; only now do
//     readers see the new clusters.
//
// Flush is fdatasync of the file (the backing image is never written).
// Discard without a backing file clears whole clusters' L2 entries, then
// punches their space out of the file; with a backing file it writes zeros
// (clearing would expose the backing data). Old blktap images whose L1 is
// little-endian keep that byte order when written.
//
// Untrusted input: every header field and table offset is checked against
// the file before use, the L1 table is capped at 32 MiB, the backing name
// at 1023 bytes, no L2 table may overlap the header, backing name or L1
// table, and a write or discard through an entry naming metadata is
// refused, with every write after it (qcow has no corrupt bit: the
// refusal lasts until the image is reopened), and errors about the image
// are *image.FormatError values that unwrap to image.ErrCorrupt,
// ErrUnsupported (AES encryption) or ErrWrongFormat.
package qcow
