package xen

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/tapengine/ring"
)

// Grant copy: for a ring without persistent grants, the hypervisor
// copies each request's data between the guest's granted pages and our
// buffer (IOCTL_GNTDEV_GRANT_COPY, as tapdisk3 does), instead of a map, an
// mmap, a munmap and an unmap of every page. No data page is ever mapped,
// so none can still be mapped when blkfront ends its foreign access.
//
//	gntdev_grant_copy_segment (24 bytes)
//	+--------------------------------+--------------------------------+-------+-------+--------+-----+
//	| source: ref32 off16 domid16    | dest: ref32 off16 domid16      | len16 | flags | status | pad |
//	|     or a local address (u64)   |     or a local address (u64)   |       |  16   |  s16   |     |
//	+--------------------------------+--------------------------------+-------+-------+--------+-----+
//	0                                8                                16      18      20       22
//
//	ioctl_gntdev_grant_copy (16 bytes): {u32 count; pad; u64 segments}
//
// flags says which side is the grant (GNTCOPY_source_gref or _dest_gref);
// the other is our memory. The ioctl fails as a whole only for a bad
// argument; a grant the hypervisor refuses sets that segment's status.
const (
	sizeGrantCopySeg = 24
	sizeGrantCopy    = 16

	offCopySource = 0
	offCopyDest   = 8
	offCopyLen    = 16
	offCopyFlags  = 18
	offCopyStatus = 20
	offCopyCount  = 0
	offCopySegs   = 8

	gntcopySourceGref = 1 << 0
	gntcopyDestGref   = 1 << 1
)

var ioctlGntdevGrantCopy = ioc(iocNone, 'G', 8, sizeGrantCopy)

// GrantCopier is a Device that can copy between a frontend's grants and
// local memory. GrantCopy copies segs in order, back to back in buf, into
// the guest's pages (toGuest) or out of them, and sets status[i] to the
// hypervisor's GNTST_* for segment i (0: copied). With no segments it only
// checks that the kernel has the ioctl (ENOTTY or EINVAL: it has not). It
// may run on several goroutines at once.
type GrantCopier interface {
	GrantCopy(domid uint32, segs []ring.CopySeg, buf []byte, toGuest bool, status []int16) error
}

// encodeCopySeg writes segment i of a grant copy: the grant side from seg,
// the local side the address addr.
func encodeCopySeg(b []byte, domid uint32, seg ring.CopySeg, addr uint64, toGuest bool) {
	grant, local, flags := offCopySource, offCopyDest, uint16(gntcopySourceGref)
	if toGuest {
		grant, local, flags = offCopyDest, offCopySource, gntcopyDestGref
	}
	ne.PutUint32(b[grant:], seg.Ref)
	ne.PutUint16(b[grant+4:], seg.Off)
	ne.PutUint16(b[grant+6:], uint16(domid))
	ne.PutUint64(b[local:], addr)
	ne.PutUint16(b[offCopyLen:], seg.Len)
	ne.PutUint16(b[offCopyFlags:], flags)
	ne.PutUint16(b[offCopyStatus:], 0)
}

// checkCopy refuses segments a grant copy cannot take: outside their page,
// empty, or not adding up to buf.
func checkCopy(segs []ring.CopySeg, buf []byte, status []int16) error {
	if len(status) < len(segs) {
		return fmt.Errorf("%w: %d statuses for %d segments", ErrBadOptions, len(status), len(segs))
	}
	n := 0
	for i, s := range segs {
		if s.Len == 0 || int(s.Off)+int(s.Len) > pageSize {
			return fmt.Errorf("%w: copy segment %d: %d bytes at %d of a page", ErrBadOptions, i, s.Len, s.Off)
		}
		n += int(s.Len)
	}
	if n != len(buf) {
		return fmt.Errorf("%w: copy segments of %d bytes for a buffer of %d", ErrBadOptions, n, len(buf))
	}
	return nil
}

// gntst names a grant table status (Xen's public grant_table.h).
func gntst(st int16) string {
	names := [...]string{"okay", "general error", "bad domain", "bad grant ref", "bad handle",
		"bad virtual address", "bad device address", "no device space", "permission denied",
		"bad page", "bad copy argument", "address too big", "eagain", "no space"}
	if st <= 0 && int(-st) < len(names) {
		return fmt.Sprintf("%s (%d)", names[-st], st)
	}
	return fmt.Sprintf("status %d", st)
}

// copyUnsupported: the kernel lacks IOCTL_GNTDEV_GRANT_COPY (before 4.7),
// or refuses it.
func copyUnsupported(err error) bool {
	return errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EINVAL)
}

var logNoCopy sync.Once

// probeCopy decides at Attach whether a non-persistent frontend's data
// moves by grant copy: the device must have the ioctl. Otherwise pages
// are mapped per request, as before, and the process says so once.
func (t *Transport) probeCopy(dev Device) {
	gc, ok := dev.(GrantCopier)
	if !ok {
		return
	}
	err := gc.GrantCopy(t.opts.Domid, nil, nil, false, nil)
	if err == nil {
		t.copy = true
		return
	}
	level := "unsupported"
	if !copyUnsupported(err) {
		level = "failed"
	}
	logNoCopy.Do(func() {
		t.log.Warn("xen: grant copy "+level+"; frontends without feature-persistent get their pages mapped per request",
			"err", err)
	})
}

// Copying reports whether data moves by grant copy (ring.Copier): for a
// frontend without persistent grants, on a kernel that has it.
func (t *Transport) Copying() bool { return t.copy }

// CopyIn copies a request's data out of the guest's pages into buf.
func (t *Transport) CopyIn(segs []ring.CopySeg, buf []byte) error {
	return t.grantCopy(segs, buf, false)
}

// CopyOut copies buf into the guest's pages.
func (t *Transport) CopyOut(segs []ring.CopySeg, buf []byte) error {
	return t.grantCopy(segs, buf, true)
}

// grantCopy is one GRANT_COPY for all of a request's segments. The lock
// is not held across the ioctl, so the ring's workers copy in parallel;
// Close never runs while the ring does.
func (t *Transport) grantCopy(segs []ring.CopySeg, buf []byte, toGuest bool) error {
	t.mu.Lock()
	dev := t.dev
	if dev == nil {
		t.mu.Unlock()
		return ErrClosed
	}
	for i, s := range segs {
		// A guest naming its own ring would have a read overwrite the
		// indices the loop is using.
		if t.ringRefs[s.Ref] {
			t.stats.CopyFailures++
			t.mu.Unlock()
			return fmt.Errorf("%w: %w: segment %d: ref %d is a ring page", ring.ErrBadGrant, ErrNotGranted, i, s.Ref)
		}
	}
	t.stats.Copies++
	t.mu.Unlock()
	status := make([]int16, len(segs))
	err := dev.(GrantCopier).GrantCopy(t.opts.Domid, segs, buf, toGuest, status)
	if err == nil {
		for i, st := range status {
			if st != 0 {
				err = fmt.Errorf("%w: %w: segment %d (gref %d, %d bytes at %d): %s",
					ring.ErrBadGrant, ErrNotGranted, i, segs[i].Ref, segs[i].Len, segs[i].Off, gntst(st))
				break
			}
		}
	}
	if err != nil {
		t.mu.Lock()
		t.stats.CopyFailures++
		t.mu.Unlock()
		return fmt.Errorf("xen: grant copy of %d segments (to the guest: %v): %w", len(segs), toGuest, err)
	}
	return nil
}

// GrantCopyAvailable reports whether this kernel's gntdev in dir (normally
// DefaultDir) has IOCTL_GNTDEV_GRANT_COPY, the same test Attach makes. The
// daemon asks once, before it offers feature-persistent: where grant copy
// works, it offers none and every frontend's data is copied.
func GrantCopyAvailable(dir string) (bool, error) {
	p := filepath.Join(dir, "gntdev")
	fd, err := unix.Open(p, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, &os.PathError{Op: "open", Path: p, Err: err}
	}
	defer unix.Close(fd)
	d := &sysDevice{gnt: fd, evt: -1}
	err = d.GrantCopy(0, nil, nil, false, nil)
	if err == nil {
		return true, nil
	}
	if copyUnsupported(err) {
		return false, nil
	}
	return false, err
}
