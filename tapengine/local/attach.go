package local

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/tapengine/ring"
)

// backend is the ring.Transport a worker gets from Attach.
type backend struct {
	memfd, kick, notify int
	mem                 []byte // the whole memfd, for data pages
	ring                []byte // the ring pages, contiguous
	pages, table        int
}

var _ ring.Transport = (*backend)(nil)

// Attach is the backend side: it maps the frontend's memory and ring
// pages. It takes ownership of all three descriptors, closing them on
// error too. ringRefs are the ring's pages in order (2^order of them),
// each of which must be granted writable.
func Attach(memfd int, ringRefs []uint32, kickFD, notifyFD int) (t ring.Transport, err error) {
	b := &backend{memfd: memfd, kick: kickFD, notify: notifyFD}
	defer func() {
		if err != nil {
			b.Close()
		}
	}()
	if n := len(ringRefs); n == 0 || n > maxRingPages || n&(n-1) != 0 {
		return nil, fmt.Errorf("%w: %d ring pages (want a power of two up to %d)", ErrBadMemory, n, maxRingPages)
	}
	var st unix.Stat_t
	if err := unix.Fstat(memfd, &st); err != nil {
		return nil, wrap("fstat memfd", err)
	}
	if st.Size < pageSize || st.Size%pageSize != 0 || st.Size > MaxPages*pageSize {
		return nil, fmt.Errorf("%w: memfd of %d bytes", ErrBadMemory, st.Size)
	}
	b.mem, err = unix.Mmap(memfd, 0, int(st.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, wrap("mmap memfd", err)
	}
	b.pages = int(st.Size / pageSize)
	if string(b.mem[:len(magic)]) != magic || le.Uint32(b.mem[offVersion:]) != version {
		return nil, fmt.Errorf("%w: no grant table header", ErrBadMemory)
	}
	// The size comes from fstat, not the header: the header only has to
	// agree with it.
	if int(le.Uint32(b.mem[offPages:])) != b.pages || int(le.Uint32(b.mem[offTablePages:])) != tablePages(b.pages) {
		return nil, fmt.Errorf("%w: header says %d pages, %d table pages; memfd has %d pages",
			ErrBadMemory, le.Uint32(b.mem[offPages:]), le.Uint32(b.mem[offTablePages:]), b.pages)
	}
	b.table = tablePages(b.pages)
	for _, ref := range ringRefs {
		if _, err := b.Page(ref, true); err != nil {
			return nil, fmt.Errorf("ring page: %w", err)
		}
	}
	if b.ring, err = mapScattered(memfd, ringRefs); err != nil {
		return nil, wrap("map ring", err)
	}
	for _, fd := range []int{kickFD, notifyFD} {
		if err := unix.SetNonblock(fd, true); err != nil {
			return nil, wrap("set non-blocking", err)
		}
	}
	return b, nil
}

func (b *backend) Ring() []byte { return b.ring }

func (b *backend) Page(ref uint32, writable bool) ([]byte, error) {
	if int(ref) < b.table || int(ref) >= b.pages {
		return nil, fmt.Errorf("%w: ref %d outside [%d, %d)", ErrNotGranted, ref, b.table, b.pages)
	}
	f := loadFlags(b.mem, ref)
	if f&FlagGranted == 0 {
		return nil, fmt.Errorf("%w: ref %d", ErrNotGranted, ref)
	}
	if writable && f&FlagReadOnly != 0 {
		return nil, fmt.Errorf("%w: ref %d is granted read-only", ErrNotGranted, ref)
	}
	off := int(ref) * pageSize
	return b.mem[off : off+pageSize : off+pageSize], nil
}

func (b *backend) WaitFD() int   { return b.kick }
func (b *backend) Ack() error    { return wrap("ack", drain(b.kick)) }
func (b *backend) Notify() error { return wrap("notify", signal(b.notify)) }

func (b *backend) Close() error {
	var errs []error
	if b.ring != nil {
		errs = append(errs, unmapScattered(b.ring))
		b.ring = nil
	}
	if b.mem != nil {
		errs = append(errs, unix.Munmap(b.mem))
		b.mem = nil
	}
	for _, fd := range []*int{&b.memfd, &b.kick, &b.notify} {
		if *fd >= 0 {
			errs = append(errs, unix.Close(*fd))
			*fd = -1
		}
	}
	return wrap("close", errors.Join(errs...))
}
