package uring

import (
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The kernel ABI (include/uapi/linux/io_uring.h), laid out as the kernel
// lays it out on every 64-bit architecture Go supports.

type sqringOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

type cqringOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

type params struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFD uint32
	resv                                                                   [3]uint32
	sqOff                                                                  sqringOffsets
	cqOff                                                                  cqringOffsets
}

// sqe is a submission queue entry (64 bytes).
//
//	+--------+-------+--------+------------+
//	| opcode | flags | ioprio |     fd     |  0
//	+--------+-------+--------+------------+
//	|          off (file offset)           |  8
//	+--------------------------------------+
//	|          addr (buffer)               | 16
//	+-------------------+------------------+
//	|        len        |  rw/fsync flags  | 24
//	+-------------------+------------------+
//	|          user_data                   | 32
//	+--------------------------------------+
//	|          unused here                 | 40..63
//	+--------------------------------------+
type sqe struct {
	opcode   uint8
	flags    uint8
	ioprio   uint16
	fd       int32
	off      uint64
	addr     uint64
	len      uint32
	opFlags  uint32
	userData uint64
	pad      [3]uint64
}

type cqe struct {
	userData uint64
	res      int32
	flags    uint32
}

const (
	sysSetup = unix.SYS_IO_URING_SETUP
	sysEnter = unix.SYS_IO_URING_ENTER

	offSQRing = 0
	offSQEs   = 0x10000000

	featSingleMmap = 1 << 0
	featNoDrop     = 1 << 1
	featRWCurPos   = 1 << 3 // 5.6: the kernel that added IORING_OP_READ/WRITE

	setupClamp       = 1 << 4
	setupCoopTaskrun = 1 << 8 // 5.19

	enterGetEvents = 1 << 0

	opRead  = 22
	opWrite = 23
)

// Static checks of the layouts against the ABI's sizes.
var (
	_ [64 - unsafe.Sizeof(sqe{})]struct{}
	_ [unsafe.Sizeof(sqe{}) - 64]struct{}
	_ [16 - unsafe.Sizeof(cqe{})]struct{}
	_ [120 - unsafe.Sizeof(params{})]struct{}
	_ [unsafe.Sizeof(params{}) - 120]struct{}
)

// queues are the shared rings as mapped into this process. The kernel
// owns sq.head and cq.tail (we only load them), we own sq.tail and cq.head
// (we only store them); the acquire/release pairs the kernel expects are
// given by sync/atomic, which is sequentially consistent.
type queues struct {
	ringMem []byte // SQ and CQ rings (one mapping: IORING_FEAT_SINGLE_MMAP)
	sqeMem  []byte

	sqHead, sqTail, cqHead, cqTail *uint32
	sqMask, cqMask                 uint32
	sqEntries                      uint32
	sqes                           []sqe
	cqes                           []cqe
}

func setup(entries uint32) (int, *queues, error) {
	var p params
	p.flags = setupClamp | setupCoopTaskrun
	fd, err := setupCall(entries, &p)
	if err == unix.EINVAL {
		// A kernel before 5.19 knows no COOP_TASKRUN.
		p = params{flags: setupClamp}
		fd, err = setupCall(entries, &p)
	}
	if err != nil {
		return -1, nil, fmt.Errorf("io_uring_setup: %w", err)
	}
	const need = featSingleMmap | featNoDrop | featRWCurPos
	if p.features&need != need {
		unix.Close(fd)
		return -1, nil, fmt.Errorf("io_uring: kernel features %#x lack %#x (Linux 5.6 or later is needed)", p.features, need)
	}
	q, err := mapQueues(fd, &p)
	if err != nil {
		unix.Close(fd)
		return -1, nil, err
	}
	return fd, q, nil
}

func setupCall(entries uint32, p *params) (int, error) {
	fd, _, errno := unix.Syscall(sysSetup, uintptr(entries), uintptr(unsafe.Pointer(p)), 0)
	if errno != 0 {
		return -1, errno
	}
	unix.CloseOnExec(int(fd))
	return int(fd), nil
}

func mapQueues(fd int, p *params) (*queues, error) {
	sqSize := p.sqOff.array + p.sqEntries*4
	cqSize := p.cqOff.cqes + p.cqEntries*uint32(unsafe.Sizeof(cqe{}))
	size := max(sqSize, cqSize)
	prot, flags := unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE
	ringMem, err := unix.Mmap(fd, offSQRing, int(size), prot, flags)
	if err != nil {
		return nil, fmt.Errorf("io_uring: mmap rings: %w", err)
	}
	sqeMem, err := unix.Mmap(fd, offSQEs, int(p.sqEntries)*int(unsafe.Sizeof(sqe{})), prot, flags)
	if err != nil {
		unix.Munmap(ringMem)
		return nil, fmt.Errorf("io_uring: mmap sqes: %w", err)
	}
	at := func(off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&ringMem[off])) }
	q := &queues{
		ringMem: ringMem, sqeMem: sqeMem,
		sqHead: at(p.sqOff.head), sqTail: at(p.sqOff.tail),
		cqHead: at(p.cqOff.head), cqTail: at(p.cqOff.tail),
		sqMask: *at(p.sqOff.ringMask), cqMask: *at(p.cqOff.ringMask),
		sqEntries: p.sqEntries,
		sqes:      unsafe.Slice((*sqe)(unsafe.Pointer(&sqeMem[0])), p.sqEntries),
		cqes:      unsafe.Slice((*cqe)(unsafe.Pointer(&ringMem[p.cqOff.cqes])), p.cqEntries),
	}
	// The SQ array is an indirection we never use: slot i always names
	// sqe i, set once here.
	array := unsafe.Slice(at(p.sqOff.array), p.sqEntries)
	for i := range array {
		array[i] = uint32(i)
	}
	return q, nil
}

func (q *queues) unmap() {
	unix.Munmap(q.sqeMem)
	unix.Munmap(q.ringMem)
}

// maxLen caps one submission's length (the SQE field is 32 bits); the
// rest of a longer buffer goes in again as a short transfer's would.
var maxLen = 1 << 30

// push fills the next submission slot; the caller has checked there is
// room. The buffer's address goes to the kernel: the caller keeps the
// slice alive (Do holds it) until the completion arrives.
func (q *queues) push(tail uint32, op uint8, fd int32, buf []byte, off int64, tag uint64) {
	buf = buf[:min(len(buf), maxLen)]
	e := &q.sqes[tail&q.sqMask]
	*e = sqe{opcode: op, fd: fd, off: uint64(off), len: uint32(len(buf)), userData: tag}
	if len(buf) > 0 {
		e.addr = uint64(uintptr(unsafe.Pointer(&buf[0])))
	}
}

func (q *queues) publish(tail uint32) { atomic.StoreUint32(q.sqTail, tail) }

func (q *queues) submitted() uint32 { return atomic.LoadUint32(q.sqHead) }

// reap calls fn for every completion posted and frees their slots.
func (q *queues) reap(fn func(tag uint64, res int32)) int {
	head := atomic.LoadUint32(q.cqHead)
	tail := atomic.LoadUint32(q.cqTail)
	n := 0
	for ; head != tail; head++ {
		c := q.cqes[head&q.cqMask]
		fn(c.userData, c.res)
		n++
	}
	atomic.StoreUint32(q.cqHead, head)
	return n
}

func enter(fd int, toSubmit, minComplete uint32, flags uint32) (int, error) {
	n, _, errno := unix.Syscall6(sysEnter, uintptr(fd), uintptr(toSubmit), uintptr(minComplete), uintptr(flags), 0, 0)
	if errno != 0 {
		return int(n), errno
	}
	return int(n), nil
}
