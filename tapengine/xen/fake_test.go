package xen

import (
	"errors"
	"fmt"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/tapengine/ring"
)

// fakeXen plays the hypervisor and the guest for one Device: the guest's
// memory is a memfd, its grant table a map from ref to page, and its
// event channel a pipe (the backend's evtchn fd) plus an eventfd (the
// guest's interrupt). It enforces what Xen and the drivers enforce: only
// granted refs map, read-only grants map only read-only, a port fires
// once and stays masked until unmasked, and every mapping is unmapped
// exactly once.
type fakeXen struct {
	domid, remotePort, localPort uint32

	memfd int
	guest []byte // the guest's view of all its pages

	mu         sync.Mutex
	grants     map[uint32]fakeGrant
	live       map[uint64]int // handle -> pages
	nextHandle uint64
	maps       int
	bound      bool
	masked     bool
	pending    bool
	notifies   int
	closed     bool
	noCopy     bool             // GrantCopy fails with ENOTTY, as before Linux 4.7
	copyStatus map[uint32]int16 // GrantCopy's status for these refs, whatever the grant
	copies     int              // GrantCopy calls with segments

	evR, evW int // the backend's evtchn fd, and the guest's end of it
	irq      int // blocking eventfd: the backend notified the guest
}

type fakeGrant struct {
	page     int
	readOnly bool
}

func newFakeXen(t testing.TB, domid uint32, pages int) *fakeXen {
	t.Helper()
	fd, err := unix.MemfdCreate("fake-guest", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, int64(pages)*pageSize); err != nil {
		t.Fatal(err)
	}
	guest, err := unix.Mmap(fd, 0, pages*pageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	irq, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeXen{domid: domid, remotePort: 7, localPort: 41, memfd: fd, guest: guest,
		grants: map[uint32]fakeGrant{}, live: map[uint64]int{}, nextHandle: 1 << 20,
		evR: p[0], evW: p[1], irq: irq}
	t.Cleanup(func() {
		unix.Munmap(guest)
		unix.Close(fd)
		unix.Close(p[1])
		unix.Close(irq)
		f.mu.Lock()
		if !f.closed {
			unix.Close(p[0])
		}
		f.mu.Unlock()
	})
	return f
}

// Guest side.

func (f *fakeXen) grant(ref uint32, page int, readOnly bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.grants[ref] = fakeGrant{page: page, readOnly: readOnly}
}

func (f *fakeXen) revoke(ref uint32) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.grants, ref)
}

func (f *fakeXen) page(p int) []byte { return f.guest[p*pageSize : (p+1)*pageSize] }

// kick is the guest signalling its port: delivered at once unless masked,
// else held until the backend unmasks.
func (f *fakeXen) kick() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.bound {
		return
	}
	if f.masked {
		f.pending = true
		return
	}
	f.fireLocked()
}

func (f *fakeXen) fireLocked() {
	f.masked = true
	if _, err := unix.Write(f.evW, encodePort(f.localPort)); err != nil {
		panic(err)
	}
}

// waitIRQ blocks until the backend has notified the guest.
func (f *fakeXen) waitIRQ() {
	var b [8]byte
	if _, err := unix.Read(f.irq, b[:]); err != nil {
		panic(err)
	}
}

func (f *fakeXen) liveMappings() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.live {
		n += c
	}
	return n
}

func (f *fakeXen) state() (bound, closed bool, notifies, maps int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.bound, f.closed, f.notifies, f.maps
}

// GrantCopy checks each segment against the grant table as Xen does:
// an unknown ref is GNTST_bad_gntref (-3), a copy into a read-only grant
// GNTST_permission_denied (-8), another domain GNTST_bad_domain (-2). The
// segments before a failed one are still copied, as the hypervisor does.
func (d *fakeDevice) GrantCopy(domid uint32, segs []ring.CopySeg, buf []byte, toGuest bool, status []int16) error {
	f := (*fakeXen)(d)
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case f.closed:
		return ErrClosed
	case f.noCopy:
		return fmt.Errorf("fake: grant copy: %w", unix.ENOTTY)
	case len(segs) == 0:
		return nil
	}
	if err := checkCopy(segs, buf, status); err != nil {
		return err
	}
	f.copies++
	for i, sg := range segs {
		local := buf[:sg.Len]
		buf = buf[sg.Len:]
		g, ok := f.grants[sg.Ref]
		st, forced := f.copyStatus[sg.Ref]
		switch {
		case forced:
		case domid != f.domid:
			st = -2
		case !ok:
			st = -3
		case toGuest && g.readOnly:
			st = -8
		}
		status[i] = st
		if st != 0 {
			continue
		}
		guest := f.guest[g.page*pageSize+int(sg.Off):][:sg.Len]
		if toGuest {
			copy(guest, local)
		} else {
			copy(local, guest)
		}
	}
	return nil
}

// device returns the backend's Device.
func (f *fakeXen) device() Device { return (*fakeDevice)(f) }

type fakeDevice fakeXen

var errFake = errors.New("fake: refused")

func (d *fakeDevice) MapGrants(domid uint32, refs []uint32, writable bool) (Mapping, error) {
	f := (*fakeXen)(d)
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return Mapping{}, ErrClosed
	}
	if domid != f.domid {
		return Mapping{}, fmt.Errorf("%w: domain %d has no grants for us", ErrNotGranted, domid)
	}
	pages := make([]int, len(refs))
	for i, r := range refs {
		g, ok := f.grants[r]
		if !ok {
			return Mapping{}, fmt.Errorf("%w: ref %d: %w", ErrNotGranted, r, unix.EINVAL)
		}
		if writable && g.readOnly {
			return Mapping{}, fmt.Errorf("%w: ref %d read-only: %w", ErrNotGranted, r, unix.EPERM)
		}
		pages[i] = g.page
	}
	prot := unix.PROT_READ
	if writable {
		prot |= unix.PROT_WRITE
	}
	mem, err := mapPages(f.memfd, pages, prot)
	if err != nil {
		return Mapping{}, err
	}
	h := f.nextHandle
	f.nextHandle += uint64(len(refs)) * pageSize
	f.live[h] = len(refs)
	f.maps++
	return Mapping{Mem: mem, Handle: h}, nil
}

func (d *fakeDevice) Unmap(m Mapping) error {
	f := (*fakeXen)(d)
	f.mu.Lock()
	defer f.mu.Unlock()
	n, ok := f.live[m.Handle]
	if !ok || n*pageSize != len(m.Mem) {
		return fmt.Errorf("%w: unmap of unknown mapping %#x (%d bytes)", errFake, m.Handle, len(m.Mem))
	}
	delete(f.live, m.Handle)
	return unmapPages(m.Mem)
}

func (d *fakeDevice) BindInterdomain(domid, remotePort uint32) (uint32, error) {
	f := (*fakeXen)(d)
	f.mu.Lock()
	defer f.mu.Unlock()
	if domid != f.domid || remotePort != f.remotePort || f.bound {
		return 0, fmt.Errorf("%w: bind %d:%d: %w", errFake, domid, remotePort, unix.EINVAL)
	}
	f.bound = true
	return f.localPort, nil
}

func (d *fakeDevice) Unbind(port uint32) error {
	f := (*fakeXen)(d)
	f.mu.Lock()
	defer f.mu.Unlock()
	if port != f.localPort || !f.bound {
		return fmt.Errorf("%w: unbind %d: %w", errFake, port, unix.ENOTCONN)
	}
	f.bound = false
	return nil
}

func (d *fakeDevice) Notify(port uint32) error {
	f := (*fakeXen)(d)
	f.mu.Lock()
	defer f.mu.Unlock()
	if port != f.localPort || !f.bound {
		return fmt.Errorf("%w: notify %d: %w", errFake, port, unix.ENOTCONN)
	}
	f.notifies++
	var one [8]byte
	one[0] = 1
	_, err := unix.Write(f.irq, one[:])
	return err
}

func (d *fakeDevice) EventFD() int { return d.evR }

func (d *fakeDevice) ReadPorts(ports []uint32) (int, error) {
	var buf [64 * sizeEvtchnPort]byte
	want := min(len(ports), 64) * sizeEvtchnPort
	n, err := unix.Read(d.evR, buf[:want])
	if errors.Is(err, unix.EAGAIN) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	return decodePorts(buf[:n], ports)
}

func (d *fakeDevice) Unmask(port uint32) error {
	f := (*fakeXen)(d)
	f.mu.Lock()
	defer f.mu.Unlock()
	if port != f.localPort || !f.bound {
		return fmt.Errorf("%w: unmask %d: %w", errFake, port, unix.ENOTCONN)
	}
	f.masked = false
	if f.pending {
		f.pending = false
		f.fireLocked()
	}
	return nil
}

func (d *fakeDevice) Close() error {
	f := (*fakeXen)(d)
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return fmt.Errorf("%w: closed twice", errFake)
	}
	f.closed = true
	return unix.Close(f.evR)
}
