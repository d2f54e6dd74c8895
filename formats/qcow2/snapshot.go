package qcow2

import (
	"encoding/binary"
	"io"
	"time"
)

// Snapshot is one internal snapshot as listed in the snapshot table
// (snapshot_ops.go creates, applies and deletes them).
type Snapshot struct {
	ID           string    `json:"id"`
	Name         string    `json:"name"`
	L1Offset     int64     `json:"l1_table_offset"`
	L1Size       uint32    `json:"l1_size"`
	Date         time.Time `json:"date"`
	VMClockNanos uint64    `json:"vm_clock_nsec"`
	VMStateSize  uint64    `json:"vm_state_size"`
	DiskSize     uint64    `json:"disk_size,omitempty"` // from the extra data; 0 if absent
	// ICount is the instruction count from the extra data; nil when
	// absent or all ones, which qemu prints as nothing.
	ICount *uint64 `json:"icount,omitempty"`

	// extra is the entry's extra data as read, kept whole when the table
	// is rewritten: fields a newer qemu added are not ours to drop.
	extra []byte
	// dateSec and dateNsec are the date fields as read: a rewritten table
	// keeps them bit for bit even where Date cannot (nanoseconds >= 1e9).
	dateSec, dateNsec uint32
}

// snapshot table entry (8-byte aligned, big-endian):
//
//	+0  l1_table_offset u64   +8  l1_size u32   +12 id_str_size u16
//	+14 name_size u16         +16 date_sec u32  +20 date_nsec u32
//	+24 vm_clock_nsec u64     +32 vm_state_size u32
//	+36 extra_data_size u32   +40 extra data, then id, then name, pad to 8
//	extra data: +0 vm_state_size_large u64, +8 disk_size u64, ...
const snapFixed = 40

// readSnapshots parses nb entries at off, each bounded by the file size and
// the table cap. It returns the table's byte length too (for Check).
func readSnapshots(r io.ReaderAt, off uint64, nb uint32, fileSize int64, cs int64) ([]Snapshot, int64, error) {
	be := binary.BigEndian
	pos := int64(off)
	var out []Snapshot
	for i := uint32(0); i < nb; i++ {
		if pos-int64(off) > maxSnapTable {
			return nil, 0, corrupt(int64(off), "snapshots", "snapshot table larger than %d bytes", maxSnapTable)
		}
		if pos+snapFixed > fileSize {
			return nil, 0, corrupt(pos, "snapshot", "snapshot %d runs past the end of the file", i)
		}
		var f [snapFixed]byte
		if _, err := r.ReadAt(f[:], pos); err != nil {
			return nil, 0, corrupt(pos, "snapshot", "snapshot %d unreadable: %v", i, err)
		}
		s := Snapshot{
			L1Offset:     int64(be.Uint64(f[0:])),
			L1Size:       be.Uint32(f[8:]),
			Date:         time.Unix(int64(be.Uint32(f[16:])), int64(be.Uint32(f[20:]))).UTC(),
			dateSec:      be.Uint32(f[16:]),
			dateNsec:     be.Uint32(f[20:]),
			VMClockNanos: be.Uint64(f[24:]),
			VMStateSize:  uint64(be.Uint32(f[32:])),
		}
		idLen, nameLen := int64(be.Uint16(f[12:])), int64(be.Uint16(f[14:]))
		extra := int64(be.Uint32(f[36:]))
		if extra > maxExtData {
			return nil, 0, corrupt(pos+36, "extra_data_size", "snapshot %d: %d bytes of extra data (at most %d)", i, extra, maxExtData)
		}
		varLen := extra + idLen + nameLen
		if pos+snapFixed+varLen > fileSize {
			return nil, 0, corrupt(pos, "snapshot", "snapshot %d runs past the end of the file", i)
		}
		v := make([]byte, varLen) // at most 1024 + 2*65535
		// An empty read at the end of a reader may say EOF.
		if _, err := r.ReadAt(v, pos+snapFixed); err != nil && varLen > 0 {
			return nil, 0, corrupt(pos, "snapshot", "snapshot %d unreadable: %v", i, err)
		}
		if extra >= 8 {
			if large := be.Uint64(v[0:]); large != 0 {
				s.VMStateSize = large
			}
		}
		if extra >= 16 {
			s.DiskSize = be.Uint64(v[8:])
		}
		if extra >= 24 {
			if n := be.Uint64(v[16:]); n != ^uint64(0) {
				s.ICount = &n
			}
		}
		s.extra = v[:extra:extra]
		s.ID = string(v[extra : extra+idLen])
		s.Name = string(v[extra+idLen:])
		if s.L1Offset%cs != 0 || uint64(s.L1Size)*8 > maxL1Bytes || s.L1Offset+int64(s.L1Size)*8 > fileSize {
			return nil, 0, corrupt(pos, "snapshot", "snapshot %d (%q): L1 table %#x+%d entries is misaligned or past the end of the file", i, s.ID, s.L1Offset, s.L1Size)
		}
		out = append(out, s)
		pos += (snapFixed + varLen + 7) &^ 7
	}
	return out, pos - int64(off), nil
}
