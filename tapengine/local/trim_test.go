package local

import (
	"bytes"
	"errors"
	"testing"
)

// TestPunch: punching data pages gives their memory back to the kernel
// (the memfd's st_blocks fall), leaves other pages alone, and the punched
// pages read as zeros afterwards, through the frontend's mapping.
func TestPunch(t *testing.T) {
	g, _ := setup(t, 64)
	first, err := g.Alloc(32)
	if err != nil {
		t.Fatal(err)
	}
	base, err := g.Allocated()
	if err != nil {
		t.Fatal(err)
	}
	mem := g.Memory(first, 32)
	for i := range mem {
		mem[i] = byte(i/pageSize) + 1
	}
	full, err := g.Allocated()
	if err != nil {
		t.Fatal(err)
	}
	if full-base < 32*pageSize {
		t.Fatalf("writing 32 pages allocated %d bytes", full-base)
	}
	// Punch pages 4..19; 0..3 and 20..31 keep their bytes.
	if err := g.Punch(first+4, 16); err != nil {
		t.Fatal(err)
	}
	after, err := g.Allocated()
	if err != nil {
		t.Fatal(err)
	}
	if full-after != 16*pageSize {
		t.Fatalf("punching 16 pages gave back %d bytes, want %d", full-after, 16*pageSize)
	}
	for p := range 32 {
		page := mem[p*pageSize : (p+1)*pageSize]
		want := bytes.Repeat([]byte{byte(p) + 1}, pageSize)
		if p >= 4 && p < 20 {
			want = make([]byte, pageSize)
		}
		if !bytes.Equal(page, want) {
			t.Fatalf("page %d after the punch: starts %x, want %x", p, page[:8], want[:8])
		}
	}
	// The pages are usable again (the mapping faults in fresh ones).
	mem[5*pageSize] = 0xAB
	if mem[5*pageSize] != 0xAB {
		t.Fatal("a punched page does not take writes")
	}
}

// TestPunchBackendSees: the backend's mapping of a punched page reads the
// zeros too (the hole is in the shared file, not in one mapping).
func TestPunchBackendSees(t *testing.T) {
	g, c := setup(t, 16)
	ringRef, _ := g.Alloc(1)
	data, _ := g.Alloc(2)
	g.Grant(ringRef, false)
	g.Grant(data, false)
	tr, err := attach(t, g, c, []uint32{ringRef})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	page, err := tr.Page(data, true)
	if err != nil {
		t.Fatal(err)
	}
	copy(page, "written by the backend")
	if !bytes.HasPrefix(g.Page(data), []byte("written by the backend")) {
		t.Fatal("the frontend does not see the backend's bytes")
	}
	if err := g.Punch(data, 2); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(page, make([]byte, pageSize)) {
		t.Fatalf("the backend's page after the punch starts %q", page[:24])
	}
}

// TestPunchRefused: the table pages and ranges past the end are refused.
func TestPunchRefused(t *testing.T) {
	g, _ := setup(t, 8)
	for _, c := range []struct {
		ref uint32
		n   int
	}{{0, 1}, {uint32(g.table) - 1, 2}, {uint32(g.pages) - 1, 2}, {uint32(g.pages), 1}, {uint32(g.table), 0}, {uint32(g.table), -1}, {1<<32 - 1, 1}} {
		if err := g.Punch(c.ref, c.n); !errors.Is(err, ErrBadMemory) {
			t.Errorf("Punch(%d, %d) = %v, want ErrBadMemory", c.ref, c.n, err)
		}
	}
	if err := g.Punch(uint32(g.table), g.pages-g.table); err != nil {
		t.Fatalf("punching every data page: %v", err)
	}
}
