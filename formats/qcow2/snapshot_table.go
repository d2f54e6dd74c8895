package qcow2

// Encoding the snapshot table and numbering new snapshots.

import (
	"encoding/binary"
	"fmt"
	"strconv"
	"time"
)

// snapExtraLen is the extra data we write for a new snapshot, qemu's
// current layout: vm_state_size_large, disk_size, icount.
const snapExtraLen = 24

// encodeSnapshots lays out a snapshot table (the layout readSnapshots
// parses).
func encodeSnapshots(snaps []Snapshot) ([]byte, error) {
	be := binary.BigEndian
	var out []byte
	for _, s := range snaps {
		if len(s.ID) > 0xffff || len(s.Name) > 0xffff {
			return nil, fmt.Errorf("qcow2: snapshot %q: id or name longer than 65535 bytes", s.Name)
		}
		var f [snapFixed]byte
		be.PutUint64(f[0:], uint64(s.L1Offset))
		be.PutUint32(f[8:], s.L1Size)
		be.PutUint16(f[12:], uint16(len(s.ID)))
		be.PutUint16(f[14:], uint16(len(s.Name)))
		sec, nsec := uint32(s.Date.Unix()), uint32(s.Date.Nanosecond())
		if s.Date.Equal(time.Unix(int64(s.dateSec), int64(s.dateNsec))) {
			sec, nsec = s.dateSec, s.dateNsec
		}
		be.PutUint32(f[16:], sec)
		be.PutUint32(f[20:], nsec)
		be.PutUint64(f[24:], s.VMClockNanos)
		be.PutUint32(f[32:], uint32(min(s.VMStateSize, 0xffffffff)))
		be.PutUint32(f[36:], uint32(len(s.extra)))
		out = append(out, f[:]...)
		out = append(out, s.extra...)
		out = append(out, s.ID...)
		out = append(out, s.Name...)
		for len(out)%8 != 0 {
			out = append(out, 0)
		}
	}
	if len(out) > maxSnapTable {
		return nil, fmt.Errorf("qcow2: snapshot table would exceed %d bytes", maxSnapTable)
	}
	return out, nil
}

// newSnapshotExtra is the extra data of a snapshot of a disk of size
// bytes: no VM state, no instruction count.
func newSnapshotExtra(size int64) []byte {
	b := make([]byte, snapExtraLen)
	binary.BigEndian.PutUint64(b[8:], uint64(size))
	return b
}

// nextSnapshotID is one more than the largest numeric ID, as qemu
// numbers snapshots.
func nextSnapshotID(snaps []Snapshot) string {
	var top uint64
	for _, s := range snaps {
		if n, err := strconv.ParseUint(s.ID, 10, 64); err == nil && n > top {
			top = n
		}
	}
	return strconv.FormatUint(top+1, 10)
}
