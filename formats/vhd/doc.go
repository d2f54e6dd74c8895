// Package vhd reads and writes Virtual Hard Disk images: fixed, dynamic
// and differencing (docs/WIRE.md, section "VHD"). All integers are big-endian.
//
// A fixed disk is the raw data followed by a footer. A dynamic or
// differencing disk is laid out as:
//
//	0       +--------------------------------------+
//	        | footer copy (512)                    |
//	512     +--------------------------------------+
//	        | dynamic header "cxsparse" (1024)     |  table_offset, block_size,
//	1536    +--------------------------------------+  parent uuid/name/locators
//	        | BAT: u32 sector of each block,       |
//	        |      0xFFFFFFFF = unallocated        |
//	        +--------------------------------------+
//	        | batmap header "tdbatmap" + map       |  (creator "tap" >= 1.2)
//	        +--------------------------------------+
//	        | parent locators (differencing)       |
//	        +--------------------------------------+
//	        | block: sector bitmap | data          |  bitmap MSB-first, 1 bit
//	        | block: ...                           |  per 512-byte sector
//	EOF-512 +--------------------------------------+
//	        | footer "conectix" (512)              |
//	        +--------------------------------------+
//
// A sector whose bitmap bit is clear is not this layer's: it reads from
// the parent (differencing) or as zeros. A differencing disk claims
// sectors in whole 4 KiB pages (the rest of a page is copied from the
// parent), because libvhdi reads such disks per page; a dynamic disk
// claims single sectors (the rest of a sector is zeroed). Created images claim creator
// "tap\0" version 1.3, as libvhd writes them: qemu then takes the size
// from current_size rather than from the CHS geometry, and libvhd expects
// the batmap that version implies, so Create writes one (all clear: no
// block claimed full). The writer keeps the batmap valid: it never sets a
// bit, and clears one before it clears bitmap bits of a block. qemu,
// which knows no batmap, allocates its first block over it; Open then
// ignores that batmap (Info shows batmap=false, Check warns).
//
// # Caller's duties
//
//  1. Open with Options.Backing set to open a differencing disk's parent;
//     the function decides which names may be opened (relative names are
//     the caller's to resolve, against the child's directory). Names are
//     tried in order: relative locator (W2ru), absolute (W2ku), MacX URL,
//     then the header's parent name. A parent whose uuid differs from the
//     one the child records is refused.
//  2. Call Flush before telling anyone a write is durable.
//  3. Close once; it flushes.
//
// # Write ordering (crash consistency)
//
// Writes to sectors whose bits are set go straight to the file. A write
// that sets bits in an allocated block of a differencing disk writes the
// data, fdatasyncs, then writes the bitmap sector, so a bit never claims
// data that a crash lost (that would hide the parent's sectors). A
// dynamic disk skips that sync: its unmarked sectors are zeros in the
// file too. A write to an unallocated block places it where the footer
// is and goes:
//
//	data + new footer after the block -> fdatasync -> bitmap (over the
//	old footer) -> fdatasync -> BAT entry
//
// so a crash leaves at worst an unreferenced block (leaked space, never
// a BAT entry over unwritten data). A crash before the first sync may
// leave the file ending in data rather than a footer; every reader then
// uses the footer copy at offset 0, and a writable Open (or Check with
// Repair) appends a footer again. Discard on a dynamic disk punches the
// data, fdatasyncs, then clears the bits. Flush is one
// fdatasync, since every metadata write is already in the file.
//
// # Limits
//
// Create refuses disks over 2040 GiB (suggesting qcow2). Headers are
// checked before use: BAT entries are capped at 2^24, block sizes at
// 256 MiB, every block must lie inside the file clear of metadata and of
// other blocks, and the footer copy, dynamic header, BAT, batmap and
// parent locators clear of one another. A corrupt image gives an
// *image.FormatError wrapping image.ErrCorrupt; an unknown disk type or
// header version wraps image.ErrUnsupported.
package vhd
