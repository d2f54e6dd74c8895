package local

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/ring"
)

func dup(t *testing.T, fd int) int {
	t.Helper()
	n, err := unix.Dup(fd)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func setup(t *testing.T, pages int) (*GrantTable, *Channel) {
	t.Helper()
	g, err := NewGrantTable(pages)
	if err != nil {
		t.Fatal(err)
	}
	c, err := NewChannel()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close(); c.Close() })
	return g, c
}

func attach(t *testing.T, g *GrantTable, c *Channel, refs []uint32) (ring.Transport, error) {
	k, n := c.BackendFDs()
	return Attach(dup(t, g.FD()), refs, dup(t, k), dup(t, n))
}

// TestGrants: the backend sees exactly what the frontend granted, with
// the access it granted, and shares the bytes.
func TestGrants(t *testing.T) {
	g, c := setup(t, 64)
	ringRef, _ := g.Alloc(4) // an order-2 ring
	data, _ := g.Alloc(3)
	refs := []uint32{ringRef, ringRef + 1, ringRef + 2, ringRef + 3}
	if _, err := attach(t, g, c, refs); !errors.Is(err, ErrNotGranted) {
		t.Fatalf("attach with an ungranted ring: %v", err)
	}
	for _, r := range refs {
		g.Grant(r, false)
	}
	tr, err := attach(t, g, c, refs)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	if len(tr.Ring()) != 4*blkif.PageSize {
		t.Fatalf("ring of %d bytes", len(tr.Ring()))
	}
	// The ring is the frontend's pages, mapped contiguously.
	g.Memory(ringRef, 4)[3*4096+5] = 0x42
	if tr.Ring()[3*4096+5] != 0x42 {
		t.Fatal("ring mapping does not share the frontend's pages")
	}
	if _, err := tr.Page(data, false); !errors.Is(err, ErrNotGranted) {
		t.Errorf("ungranted page: %v", err)
	}
	g.Grant(data, true)
	p, err := tr.Page(data, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tr.Page(data, true); !errors.Is(err, ErrNotGranted) {
		t.Errorf("writable map of a read-only grant: %v", err)
	}
	g.Page(data)[7] = 9
	if p[7] != 9 {
		t.Error("data page not shared")
	}
	g.Grant(data+1, false)
	if p, err := tr.Page(data+1, true); err != nil {
		t.Error(err)
	} else {
		p[0] = 3
		if g.Page(data + 1)[0] != 3 {
			t.Error("backend write not seen by the frontend")
		}
	}
	g.Revoke(data + 1)
	if _, err := tr.Page(data+1, false); !errors.Is(err, ErrNotGranted) {
		t.Errorf("revoked page: %v", err)
	}
	for _, ref := range []uint32{0, 1 << 20, ^uint32(0)} {
		if _, err := tr.Page(ref, false); !errors.Is(err, ErrNotGranted) {
			t.Errorf("ref %d: %v", ref, err)
		}
	}
	if err := g.Grant(0, false); !errors.Is(err, ErrBadMemory) {
		t.Errorf("granting the table page: %v", err)
	}
}

// TestSignals: kick and notify reach the other side, Ack consumes.
func TestSignals(t *testing.T) {
	g, c := setup(t, 8)
	r, _ := g.Alloc(1)
	g.Grant(r, false)
	tr, err := attach(t, g, c, []uint32{r})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	readable := func(fd int) bool {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, 0)
		return err == nil && n == 1
	}
	if readable(tr.WaitFD()) {
		t.Fatal("kick pending before any kick")
	}
	c.Kick()
	c.Kick()
	if !readable(tr.WaitFD()) {
		t.Fatal("kick not seen")
	}
	tr.Ack()
	if readable(tr.WaitFD()) {
		t.Fatal("Ack left a kick pending")
	}
	tr.Notify()
	if !readable(c.WaitFD()) {
		t.Fatal("notify not seen")
	}
	c.Ack()
	if readable(c.WaitFD()) {
		t.Fatal("Ack left a notify pending")
	}
}

// TestAttachRefuses: bad memory and bad parameters fail cleanly (and the
// fds are closed).
func TestAttachRefuses(t *testing.T) {
	g, c := setup(t, 8)
	r, _ := g.Alloc(1)
	g.Grant(r, false)
	for name, refs := range map[string][]uint32{"none": nil, "three": {r, r, r}, "32": make([]uint32, 32)} {
		if _, err := attach(t, g, c, refs); !errors.Is(err, ErrBadMemory) {
			t.Errorf("%s ring refs: %v", name, err)
		}
	}
	// A memfd that is not a grant table.
	fd, _ := unix.MemfdCreate("junk", 0)
	unix.Ftruncate(fd, 8192)
	k, n := c.BackendFDs()
	if _, err := Attach(fd, []uint32{1}, dup(t, k), dup(t, n)); !errors.Is(err, ErrBadMemory) {
		t.Errorf("junk memfd: %v", err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); !errors.Is(err, unix.EBADF) {
		t.Errorf("Attach did not close the memfd on error: %v", err)
	}
	// A header that lies about the size.
	g2, _ := NewGrantTable(4)
	defer g2.Close()
	le.PutUint32(g2.mem[offPages:], 1000)
	if _, err := Attach(dup(t, g2.FD()), []uint32{1}, dup(t, k), dup(t, n)); !errors.Is(err, ErrBadMemory) {
		t.Errorf("lying header: %v", err)
	}
	if _, err := NewGrantTable(MaxPages); !errors.Is(err, ErrNoSpace) {
		t.Errorf("oversized table: %v", err)
	}
	if _, err := g.Alloc(1000); !errors.Is(err, ErrNoSpace) {
		t.Errorf("over-allocation: %v", err)
	}
}
