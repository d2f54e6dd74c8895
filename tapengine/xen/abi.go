package xen

import "encoding/binary"

// ioctl request numbers, built the way the kernel's generic _IOC macro
// builds them (asm-generic/ioctl.h, which x86 and Arm use):
//
//	 31  30 29            16 15          8 7           0
//	+------+----------------+-------------+-------------+
//	| dir  |   size (14)    |  type char  |     nr      |
//	+------+----------------+-------------+-------------+
//
// Every gntdev and evtchn ioctl used here is declared with _IOC_NONE
// (dir 0) even though it passes a struct both ways; the size field still
// carries sizeof the struct as declared (for MAP_GRANT_REF, with its
// one-element refs array). abi_test.go checks each number and struct size
// against the installed uapi headers with gcc.
const (
	iocNone      = 0
	iocNRShift   = 0
	iocTypeShift = 8
	iocSizeShift = 16
	iocDirShift  = 30
)

func ioc(dir, typ, nr, size uintptr) uintptr {
	return dir<<iocDirShift | size<<iocSizeShift | typ<<iocTypeShift | nr<<iocNRShift
}

// Struct sizes as the headers declare them (linux/include/uapi/xen).
const (
	sizeGntdevGrantRef     = 8  // struct ioctl_gntdev_grant_ref {u32 domid; u32 ref}
	sizeGntdevMapGrantRef  = 24 // {u32 count; u32 pad; u64 index; grant_ref refs[1]}
	sizeGntdevUnmapGrant   = 16 // {u64 index; u32 count; u32 pad}
	sizeGntdevUnmapNotify  = 16 // {u64 index; u32 action; u32 event_channel_port}
	sizeEvtchnBindInterdom = 8  // {unsigned int remote_domain, remote_port}
	sizeEvtchnPort         = 4  // {unsigned int port}: unbind, notify
)

// Request numbers.
var (
	ioctlGntdevMapGrantRef     = ioc(iocNone, 'G', 0, sizeGntdevMapGrantRef)
	ioctlGntdevUnmapGrantRef   = ioc(iocNone, 'G', 1, sizeGntdevUnmapGrant)
	ioctlGntdevSetUnmapNotify  = ioc(iocNone, 'G', 7, sizeGntdevUnmapNotify)
	ioctlEvtchnBindInterdomain = ioc(iocNone, 'E', 1, sizeEvtchnBindInterdom)
	ioctlEvtchnUnbind          = ioc(iocNone, 'E', 3, sizeEvtchnPort)
	ioctlEvtchnNotify          = ioc(iocNone, 'E', 4, sizeEvtchnPort)
)

// Argument layouts, encoded at explicit offsets in native byte order
// (the kernel reads them as C structs of this machine):
//
//	ioctl_gntdev_map_grant_ref (16 + 8*count bytes)
//	+---------+---------+-----------+----------+---------+----------+--
//	| count32 | pad32   | index64   | domid32  | ref32   | domid32  | ...
//	+---------+---------+-----------+----------+---------+----------+--
//	0         4         8 (out)     16         20        24
//
//	ioctl_gntdev_unmap_grant_ref (16 bytes)
//	+-----------+---------+-------+
//	| index64   | count32 | pad32 |
//	+-----------+---------+-------+
//	0           8         12
//
//	ioctl_evtchn_bind_interdomain (8 bytes)    ioctl_evtchn_{unbind,notify} (4 bytes)
//	+---------------+-------------+            +--------+
//	| remote_domain | remote_port |            | port32 |
//	+---------------+-------------+            +--------+
//	0               4                          0
const (
	offMapCount = 0
	offMapIndex = 8
	offMapRefs  = 16

	offUnmapIndex = 0
	offUnmapCount = 8
)

var ne = binary.NativeEndian

// encodeMapGrantRef builds the argument of IOCTL_GNTDEV_MAP_GRANT_REF for
// refs of one domain. The kernel writes the mmap offset at offMapIndex.
func encodeMapGrantRef(domid uint32, refs []uint32) []byte {
	b := make([]byte, offMapRefs+sizeGntdevGrantRef*len(refs))
	ne.PutUint32(b[offMapCount:], uint32(len(refs)))
	for i, r := range refs {
		ne.PutUint32(b[offMapRefs+sizeGntdevGrantRef*i:], domid)
		ne.PutUint32(b[offMapRefs+sizeGntdevGrantRef*i+4:], r)
	}
	return b
}

func encodeUnmapGrantRef(index uint64, count uint32) []byte {
	b := make([]byte, sizeGntdevUnmapGrant)
	ne.PutUint64(b[offUnmapIndex:], index)
	ne.PutUint32(b[offUnmapCount:], count)
	return b
}

func encodeBindInterdomain(domid, remotePort uint32) []byte {
	b := make([]byte, sizeEvtchnBindInterdom)
	ne.PutUint32(b[0:], domid)
	ne.PutUint32(b[4:], remotePort)
	return b
}

func encodePort(port uint32) []byte {
	b := make([]byte, sizeEvtchnPort)
	ne.PutUint32(b, port)
	return b
}
