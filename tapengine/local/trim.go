package local

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Punch gives the memory of n data pages from ref back to the kernel: the
// pages are removed from the memfd (FALLOC_FL_PUNCH_HOLE, size kept), so
// they leave the resident set of every process that maps them, the
// backend's included, and read as zeros when next touched.
//
// Why: a page touched once stays resident in the memfd, and in both the
// frontend's and the worker's RSS, until the disk goes away; a burst of
// big requests would otherwise pin the whole grant table for good.
//
// The caller's duty: no request in flight may name these pages (their
// contents are lost). Table pages (the header and flags) are refused.
func (g *GrantTable) Punch(ref uint32, n int) error {
	if n < 1 || int(ref) < g.table || int(ref) > g.pages-n {
		return fmt.Errorf("%w: punch %d pages at ref %d outside [%d, %d)", ErrBadMemory, n, ref, g.table, g.pages)
	}
	err := unix.Fallocate(g.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE,
		int64(ref)*pageSize, int64(n)*pageSize)
	return wrap("punch hole", err)
}

// Allocated is how many bytes of memory the memfd holds now (its
// st_blocks): what Punch gives back, for tests and metrics.
func (g *GrantTable) Allocated() (int64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(g.fd, &st); err != nil {
		return 0, wrap("fstat", err)
	}
	return st.Blocks * 512, nil
}

// Pages is the size of the memfd in pages, the table pages included.
func (g *GrantTable) Pages() int { return g.pages }
