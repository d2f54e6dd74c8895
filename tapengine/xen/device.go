package xen

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Error classes. Every error this package returns wraps one of them (or
// an errno from the kernel, for failures no class describes).
var (
	// ErrNoXen: /dev/xen/gntdev or /dev/xen/evtchn is missing, so this
	// is not a Xen dom0 (or the xen-gntdev / xen-evtchn modules are not
	// loaded). Retrying will not help.
	ErrNoXen = errors.New("xen: not a Xen dom0")
	// ErrNotGranted: the hypervisor refused to map a grant ref (not
	// granted to us, granted read-only when writing was asked, or out of
	// the frontend's grant table), or the ref is one this transport will
	// not hand out as a data page.
	ErrNotGranted = errors.New("xen: grant ref not granted")
	// ErrBadOptions: the transport parameters (from the frontend's
	// xenstore keys) are unusable.
	ErrBadOptions = errors.New("xen: bad transport parameters")
	// ErrTooManyMappings: the per-transport cap on live data-page
	// mappings is reached.
	ErrTooManyMappings = errors.New("xen: too many grant mappings")
	// ErrClosed: the transport or device is closed.
	ErrClosed = errors.New("xen: closed")
)

// Mapping is memory a Device mapped from a frontend's grant refs.
type Mapping struct {
	// Mem is 4096 bytes per ref, in the order the refs were given.
	Mem []byte
	// Handle is the device's own name for the mapping (gntdev: the
	// offset MAP_GRANT_REF returned), passed back to Unmap.
	Handle uint64
}

// Device is the kernel interface a Xen transport needs: gntdev to map the
// frontend's pages, evtchn to exchange events with it. One Device serves
// one ring (one bound port); it is not safe for concurrent use.
type Device interface {
	// MapGrants maps refs of domain domid contiguously, writable or
	// read-only. A ref the hypervisor refuses fails the whole call with
	// an error wrapping ErrNotGranted and leaves nothing mapped.
	MapGrants(domid uint32, refs []uint32, writable bool) (Mapping, error)
	// Unmap releases a mapping; its memory must not be touched after.
	Unmap(m Mapping) error
	// BindInterdomain binds the frontend's port remotePort of domain
	// domid and returns the local port.
	BindInterdomain(domid, remotePort uint32) (localPort uint32, err error)
	// Unbind releases a local port.
	Unbind(localPort uint32) error
	// Notify signals the remote end of a bound local port.
	Notify(localPort uint32) error
	// EventFD is readable when a bound port has fired.
	EventFD() int
	// ReadPorts fills ports with the local ports that fired since the
	// last call, without blocking (0, nil when none). A port that fired
	// stays masked until Unmask.
	ReadPorts(ports []uint32) (int, error)
	// Unmask re-enables a port after it fired.
	Unmask(localPort uint32) error
	// Close releases the device's descriptors.
	Close() error
}

// DefaultDir is where a dom0 kernel exposes the Xen devices.
const DefaultDir = "/dev/xen"

// OpenDevice opens /dev/xen/gntdev and /dev/xen/evtchn.
func OpenDevice() (Device, error) { return openDevice(DefaultDir) }

func openDevice(dir string) (Device, error) {
	open := func(name string, flags int) (int, error) {
		p := filepath.Join(dir, name)
		fd, err := unix.Open(p, flags|unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err == nil {
			return fd, nil
		}
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENXIO) {
			return -1, fmt.Errorf("%w: %s: %w (load xen-gntdev and xen-evtchn, or run in dom0)", ErrNoXen, p, err)
		}
		return -1, &os.PathError{Op: "open", Path: p, Err: err}
	}
	gnt, err := open("gntdev", 0)
	if err != nil {
		return nil, err
	}
	// Non-blocking: Ack reads until the fd is empty and must not sleep.
	evt, err := open("evtchn", unix.O_NONBLOCK)
	if err != nil {
		unix.Close(gnt)
		return nil, err
	}
	return &sysDevice{gnt: gnt, evt: evt}, nil
}

// sysDevice is the real Device over the kernel's gntdev and evtchn.
type sysDevice struct {
	gnt, evt int
	buf      [64 * sizeEvtchnPort]byte
}

// maxMapRefs bounds one MAP_GRANT_REF call: a ring is at most 16 pages
// and data pages are mapped one by one.
const maxMapRefs = 1 << 10

func (d *sysDevice) MapGrants(domid uint32, refs []uint32, writable bool) (Mapping, error) {
	if d.gnt < 0 {
		return Mapping{}, ErrClosed
	}
	if len(refs) == 0 || len(refs) > maxMapRefs {
		return Mapping{}, fmt.Errorf("%w: %d refs in one mapping", ErrBadOptions, len(refs))
	}
	arg := encodeMapGrantRef(domid, refs)
	if _, err := ioctl(d.gnt, ioctlGntdevMapGrantRef, arg); err != nil {
		return Mapping{}, fmt.Errorf("xen: gntdev map grant ref: %w", err)
	}
	index := ne.Uint64(arg[offMapIndex:])
	// The hypercall happens in mmap, so this is where a bad ref fails;
	// gntdev maps read-only exactly when the mapping is not PROT_WRITE.
	prot := unix.PROT_READ
	if writable {
		prot |= unix.PROT_WRITE
	}
	mem, err := unix.Mmap(d.gnt, int64(index), len(refs)*pageSize, prot, unix.MAP_SHARED)
	if err != nil {
		_, uerr := ioctl(d.gnt, ioctlGntdevUnmapGrantRef, encodeUnmapGrantRef(index, uint32(len(refs))))
		return Mapping{}, errors.Join(
			fmt.Errorf("%w: domain %d refs %v (writable %v): mmap: %w", ErrNotGranted, domid, refs, writable, err),
			wrapErr("gntdev unmap grant ref", uerr))
	}
	return Mapping{Mem: mem, Handle: index}, nil
}

func (d *sysDevice) Unmap(m Mapping) error {
	if d.gnt < 0 {
		return ErrClosed
	}
	n := len(m.Mem) / pageSize
	// Unmap the memory first: gntdev drops the grant mapping when the
	// last reference to it goes, which the ioctl alone does not do.
	err := wrapErr("munmap", unix.Munmap(m.Mem))
	_, ierr := ioctl(d.gnt, ioctlGntdevUnmapGrantRef, encodeUnmapGrantRef(m.Handle, uint32(n)))
	return errors.Join(err, wrapErr("gntdev unmap grant ref", ierr))
}

func (d *sysDevice) BindInterdomain(domid, remotePort uint32) (uint32, error) {
	if d.evt < 0 {
		return 0, ErrClosed
	}
	r, err := ioctl(d.evt, ioctlEvtchnBindInterdomain, encodeBindInterdomain(domid, remotePort))
	if err != nil {
		return 0, fmt.Errorf("xen: evtchn bind interdomain (domain %d port %d): %w", domid, remotePort, err)
	}
	return uint32(r), nil
}

func (d *sysDevice) Unbind(port uint32) error {
	if d.evt < 0 {
		return ErrClosed
	}
	_, err := ioctl(d.evt, ioctlEvtchnUnbind, encodePort(port))
	return wrapErr("evtchn unbind", err)
}

func (d *sysDevice) Notify(port uint32) error {
	if d.evt < 0 {
		return ErrClosed
	}
	_, err := ioctl(d.evt, ioctlEvtchnNotify, encodePort(port))
	return wrapErr("evtchn notify", err)
}

func (d *sysDevice) EventFD() int { return d.evt }

func (d *sysDevice) ReadPorts(ports []uint32) (int, error) {
	if d.evt < 0 {
		return 0, ErrClosed
	}
	// The driver hands out whole u32 ports; ask for a multiple of 4.
	want := min(len(ports), len(d.buf)/sizeEvtchnPort) * sizeEvtchnPort
	if want == 0 {
		return 0, nil
	}
	n, err := unix.Read(d.evt, d.buf[:want])
	if errors.Is(err, unix.EAGAIN) {
		return 0, nil
	}
	if err != nil {
		return 0, wrapErr("evtchn read", err)
	}
	return decodePorts(d.buf[:n], ports)
}

func (d *sysDevice) Unmask(port uint32) error {
	if d.evt < 0 {
		return ErrClosed
	}
	_, err := unix.Write(d.evt, encodePort(port))
	return wrapErr("evtchn unmask", err)
}

func (d *sysDevice) Close() error {
	var errs []error
	for _, fd := range []*int{&d.gnt, &d.evt} {
		if *fd >= 0 {
			errs = append(errs, unix.Close(*fd))
			*fd = -1
		}
	}
	return wrapErr("close", errors.Join(errs...))
}

// decodePorts turns what the evtchn fd returned into ports. The kernel
// never returns a partial port; if it did, that is an error, not a
// truncation.
func decodePorts(b []byte, ports []uint32) (int, error) {
	if len(b)%sizeEvtchnPort != 0 {
		return 0, fmt.Errorf("xen: evtchn read returned %d bytes, not whole ports", len(b))
	}
	n := min(len(b)/sizeEvtchnPort, len(ports))
	for i := range n {
		ports[i] = ne.Uint32(b[i*sizeEvtchnPort:])
	}
	return n, nil
}

func wrapErr(op string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("xen: %s: %w", op, err)
}
