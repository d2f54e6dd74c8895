// Package local is the transport between a local frontend and a ring
// worker on a machine without Xen: a memfd stands in for guest memory and
// its grant table, and two eventfds stand in for an event channel.
//
// The memfd, as both sides map it (all integers little-endian):
//
//	page 0                                                      page T    page T+1
//	+---------+---------+-------+------------+------------------+---------+---------+--
//	| magic 8 | version | pages | tablePages | flags[ref] u32.. | data    | data    | ...
//	+---------+---------+-------+------------+------------------+---------+---------+--
//	0         8         12      16           64
//
// A grant ref names a page of the memfd: ref r is bytes [r*4096, r*4096+4096).
// The first tablePages pages hold the header and one u32 of flags per ref
// (FlagGranted, FlagReadOnly); those refs can never be granted. The
// frontend sets and clears the flags; the backend checks them on every
// Page call and refuses a page that is not granted, or that is granted
// read-only when it wants to write. A page the backend mapped stays
// mapped until the backend closes, as with a Xen grant mapping.
//
// The frontend's duties, in order:
//
//  1. NewGrantTable(pages), Alloc the ring pages, initialise the ring
//     (ring.Front.Init), Grant the ring pages writable.
//  2. NewChannel for the two eventfds.
//  3. Hand the memfd, the ring refs and Channel.BackendFDs to the backend
//     (over a unix socket with SCM_RIGHTS when the backend is a worker
//     process), which calls Attach and serves the ring.
//  4. Grant each data page before pushing a request naming it; revoke it
//     after the response.
//
// Signals: the frontend writes the kick eventfd after publishing requests
// (when ring.Front.PushRequests says so); the backend writes the notify
// eventfd after publishing responses. Both are non-blocking eventfds, so
// Ack drains every pending signal in one read.
package local

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Header layout.
const (
	magic          = "BLKTAPGT"
	version        = 1
	offVersion     = 8
	offPages       = 12
	offTablePages  = 16
	offFlags       = 64
	pageSize       = 4096
	MaxPages       = 1 << 16 // 256 MiB of shared memory per frontend
	maxRingPages   = 16
	FlagGranted    = 1 << 0
	FlagReadOnly   = 1 << 1
	eventfdCounter = 8
)

// Error classes.
var (
	// ErrNotGranted: the backend asked for a page the frontend has not
	// granted (or not writable when writing).
	ErrNotGranted = errors.New("local: page not granted")
	// ErrBadMemory: the memfd or its header is not a grant table.
	ErrBadMemory = errors.New("local: bad shared memory")
	// ErrNoSpace: the grant table has no free pages left.
	ErrNoSpace = errors.New("local: grant table full")
)

func tablePages(pages int) int {
	return (offFlags + 4*pages + pageSize - 1) / pageSize
}

var le = binary.LittleEndian

func signal(fd int) error {
	var one [eventfdCounter]byte
	le.PutUint64(one[:], 1)
	_, err := unix.Write(fd, one[:])
	if errors.Is(err, unix.EAGAIN) {
		// The counter is saturated: the peer has a signal pending anyway.
		return nil
	}
	return err
}

func drain(fd int) error {
	var buf [eventfdCounter]byte
	_, err := unix.Read(fd, buf[:])
	if errors.Is(err, unix.EAGAIN) {
		return nil
	}
	return err
}

func wrap(op string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("local: %s: %w", op, err)
}
