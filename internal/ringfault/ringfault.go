// Package ringfault breaks the local rings of a running process, for
// tests of what the daemon does when its own frontend finds a ring it
// cannot trust. It reaches in from outside, as a broken worker would,
// so the code under test carries no hook for it.
package ringfault

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/tapengine/blkif"
)

const (
	pageSize = 4096
	// Where the grant table's header keeps its own size in pages
	// (tapengine/local): the first ring page follows the table.
	offTablePages = 16
)

// Index is the producer index a break moves.
type Index int

const (
	// Responses: rsp_prod runs past the requests, a backend answering
	// requests never made; the frontend gives up.
	Responses Index = iota
	// Requests: req_prod runs a ring ahead, a frontend publishing more
	// than fits; the backend stops the ring.
	Requests
)

// BreakRings moves one producer index of every local ring in process pid
// 1000 entries ahead and then signals every eventfd the process holds
// (the frontend's notify and kick among them), so both ends read the ring
// now instead of at the next request. pid is the process of the local
// frontends (the daemon). It returns how many rings it broke. The caller
// must be allowed to ptrace pid (root, or its parent).
func BreakRings(pid int, idx Index) (int, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var eventfds []int
	broken := 0
	for _, e := range ents {
		link, err := os.Readlink(dir + "/" + e.Name())
		if err != nil {
			continue // closed meanwhile
		}
		n, _ := strconv.Atoi(e.Name())
		switch {
		case strings.HasPrefix(link, "/memfd:blktap-grants"):
			if err := breakRing(dir+"/"+e.Name(), idx); err != nil {
				return broken, err
			}
			broken++
		case link == "anon_inode:[eventfd]":
			eventfds = append(eventfds, n)
		}
	}
	if broken == 0 {
		return 0, errors.New("ringfault: no local ring in the process")
	}
	pfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return broken, fmt.Errorf("pidfd_open: %w", err)
	}
	defer unix.Close(pfd)
	one := make([]byte, 8)
	binary.NativeEndian.PutUint64(one, 1)
	for _, n := range eventfds {
		fd, err := unix.PidfdGetfd(pfd, n, 0)
		if err != nil {
			continue // closed meanwhile
		}
		_, err = unix.Write(fd, one)
		unix.Close(fd)
		if err != nil && !errors.Is(err, unix.EAGAIN) {
			return broken, fmt.Errorf("signal eventfd %d: %w", n, err)
		}
	}
	return broken, nil
}

func breakRing(path string, idx Index) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	head, err := unix.Mmap(int(f.Fd()), 0, pageSize, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("ringfault: map grant table: %w", err)
	}
	table := int64(binary.LittleEndian.Uint32(head[offTablePages:]))
	unix.Munmap(head)
	ring, err := unix.Mmap(int(f.Fd()), table*pageSize, pageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("ringfault: map ring page %d: %w", table, err)
	}
	defer unix.Munmap(ring)
	off := blkif.OffRspProd
	if idx == Requests {
		off = blkif.OffReqProd
	}
	prod := binary.LittleEndian.Uint32(ring[off:])
	binary.LittleEndian.PutUint32(ring[off:], prod+1000)
	return nil
}
