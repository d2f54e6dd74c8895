package local

import (
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// GrantTable is the frontend's side of the shared memory: it owns the
// memfd, allocates pages and grants or revokes the backend's access to
// them. Safe for concurrent use.
type GrantTable struct {
	fd    int
	mem   []byte
	pages int
	table int // pages holding the header and flags

	mu   sync.Mutex
	next int // next unallocated page (a bump allocator: pages are never freed)
}

// NewGrantTable creates a memfd with room for pages data pages (besides
// the table pages) and writes the header.
func NewGrantTable(pages int) (*GrantTable, error) {
	if pages < 1 {
		return nil, fmt.Errorf("%w: %d pages", ErrBadMemory, pages)
	}
	total := pages
	for total < pages+tablePages(total) {
		total = pages + tablePages(total)
	}
	if total > MaxPages {
		return nil, fmt.Errorf("%w: %d pages asked, at most %d", ErrNoSpace, pages, MaxPages-tablePages(MaxPages))
	}
	fd, err := unix.MemfdCreate("blktap-grants", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, wrap("memfd_create", err)
	}
	if err := unix.Ftruncate(fd, int64(total)*pageSize); err != nil {
		unix.Close(fd)
		return nil, wrap("ftruncate", err)
	}
	mem, err := unix.Mmap(fd, 0, total*pageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return nil, wrap("mmap", err)
	}
	g := &GrantTable{fd: fd, mem: mem, pages: total, table: tablePages(total)}
	copy(mem, magic)
	le.PutUint32(mem[offVersion:], version)
	le.PutUint32(mem[offPages:], uint32(total))
	le.PutUint32(mem[offTablePages:], uint32(g.table))
	g.next = g.table
	return g, nil
}

// FD is the memfd, to hand to the backend (the table keeps ownership).
func (g *GrantTable) FD() int { return g.fd }

// Alloc reserves n consecutive pages and returns the first ref. The pages
// are not granted.
func (g *GrantTable) Alloc(n int) (uint32, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if n < 1 || n > g.pages-g.next {
		return 0, fmt.Errorf("%w: %d pages asked, %d free", ErrNoSpace, n, g.pages-g.next)
	}
	first := g.next
	g.next += n
	return uint32(first), nil
}

// Memory is the frontend's view of n consecutive pages from ref.
func (g *GrantTable) Memory(ref uint32, n int) []byte {
	return g.mem[int(ref)*pageSize : (int(ref)+n)*pageSize]
}

// Page is the frontend's view of one page.
func (g *GrantTable) Page(ref uint32) []byte { return g.Memory(ref, 1) }

func (g *GrantTable) check(ref uint32) error {
	if int(ref) < g.table || int(ref) >= g.pages {
		return fmt.Errorf("%w: ref %d outside [%d, %d)", ErrBadMemory, ref, g.table, g.pages)
	}
	return nil
}

// Grant lets the backend map ref; readOnly forbids it to write the page.
// Publish the grant before the request naming it (the atomic store
// orders it before the ring's producer index).
func (g *GrantTable) Grant(ref uint32, readOnly bool) error {
	if err := g.check(ref); err != nil {
		return err
	}
	f := uint32(FlagGranted)
	if readOnly {
		f |= FlagReadOnly
	}
	storeFlags(g.mem, ref, f)
	return nil
}

// Revoke withdraws the grant on ref. Mappings the backend already made stay
// valid (as with Xen, where the frontend must wait for the response).
func (g *GrantTable) Revoke(ref uint32) error {
	if err := g.check(ref); err != nil {
		return err
	}
	storeFlags(g.mem, ref, 0)
	return nil
}

// Close unmaps the table and closes the memfd. Backends that attached keep
// their own mapping.
func (g *GrantTable) Close() error {
	err := unix.Munmap(g.mem)
	if cerr := unix.Close(g.fd); err == nil {
		err = cerr
	}
	return wrap("close grant table", err)
}

// Channel is the frontend's side of the event channel: two non-blocking
// eventfds, kick (frontend -> backend) and notify (backend -> frontend).
type Channel struct {
	kick, notify int
}

// NewChannel creates both eventfds.
func NewChannel() (*Channel, error) {
	kick, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, wrap("eventfd", err)
	}
	notify, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(kick)
		return nil, wrap("eventfd", err)
	}
	return &Channel{kick: kick, notify: notify}, nil
}

// Kick signals the backend.
func (c *Channel) Kick() error { return wrap("kick", signal(c.kick)) }

// WaitFD is readable when the backend has signalled.
func (c *Channel) WaitFD() int { return c.notify }

// Ack consumes the backend's pending signals.
func (c *Channel) Ack() error { return wrap("ack", drain(c.notify)) }

// BackendFDs are the descriptors to hand to the backend (the channel keeps
// ownership; the receiver gets its own copies).
func (c *Channel) BackendFDs() (kick, notify int) { return c.kick, c.notify }

// Close closes both eventfds.
func (c *Channel) Close() error {
	err := unix.Close(c.kick)
	if cerr := unix.Close(c.notify); err == nil {
		err = cerr
	}
	return wrap("close channel", err)
}

// Wake signals the frontend's own notify eventfd, to wake a frontend
// thread sleeping on WaitFD (when the frontend closes).
func (c *Channel) Wake() error { return wrap("wake", signal(c.notify)) }
