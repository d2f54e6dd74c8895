package qcow2

import (
	"encoding/binary"
	"fmt"
	"os"

	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// RepairMode says what Check may fix.
type RepairMode int

const (
	// RepairNone only reports.
	RepairNone RepairMode = iota
	// RepairLeaks lowers refcounts that are higher than the references
	// (leaked clusters), like `qemu-img check -r leaks`. On an image
	// marked corrupt it repairs as RepairAll: the bit says refcounts or
	// flags are wrong, and `blktap image check --repair`, which the
	// corrupt error names, must be able to fix what it can.
	RepairLeaks
	// RepairAll also raises refcounts that are too low and fixes copied
	// flags, like `qemu-img check -r all`.
	RepairAll
)

// CheckOptions tune Check.
type CheckOptions struct {
	Repair RepairMode
}

// CheckResult is what `image check` prints. Leaks waste space only;
// corruptions can lose data if the image is written.
type CheckResult struct {
	Corruptions        int64    `json:"corruptions"`
	Leaks              int64    `json:"leaks"`
	CorruptionsFixed   int64    `json:"corruptions_fixed"`
	LeaksFixed         int64    `json:"leaks_fixed"`
	Problems           []string `json:"problems,omitempty"` // the first maxProblems, for people
	TotalClusters      int64    `json:"total_clusters"`     // guest clusters
	AllocatedClusters  int64    `json:"allocated_clusters"` // guest clusters with data in this layer
	CompressedClusters int64    `json:"compressed_clusters"`
	// FragmentedClusters counts, as qemu-img check does, allocated
	// clusters that do not follow the previous one in the file; every
	// compressed cluster counts as fragmented.
	FragmentedClusters int64 `json:"fragmented_clusters"`
	ImageEndOffset     int64 `json:"image_end_offset"`
}

// Clean reports whether nothing is wrong (after any repair).
func (r *CheckResult) Clean() bool {
	return r.Corruptions == r.CorruptionsFixed && r.Leaks == r.LeaksFixed
}

const (
	maxProblems      = 100
	maxCheckClusters = 1 << 28 // 1 GiB of counters
)

// Check verifies the image at path: every cluster's stored refcount
// against the references from the header, L1/L2 tables (active and
// snapshots), refcount structures and snapshot table, and the copied
// flags of the active tables. A header too broken to walk is returned as
// an error (a *image.FormatError).
func Check(path string, opts CheckOptions) (*CheckResult, error) {
	ro := opts.Repair == RepairNone
	img, err := hostfile.OpenWith(path, ro, "qcow2", func(f *os.File) (*Image, error) {
		if err := lockImage(f, !ro); err != nil {
			return nil, err
		}
		return openStorage(hostfile.OSFile{File: f}, path, Options{ReadOnly: ro, checkOnly: true})
	})
	if err != nil {
		return nil, err
	}
	mode := opts.Repair
	if mode == RepairLeaks && img.hdr.incompatible&incCorrupt != 0 {
		mode = RepairAll
	}
	return img.checkAndClose(mode)
}

func (img *Image) checkAndClose(mode RepairMode) (*CheckResult, error) {
	res, err := img.check(mode)
	if err == nil && res.Clean() && mode != RepairNone && !img.ro {
		// Repaired (or never damaged), and the metadata does not overlap:
		// the image may be written again.
		img.mu.Lock()
		if img.checkLayoutLocked() == nil {
			err = img.clearCorruptLocked()
		}
		img.mu.Unlock()
	}
	if err != nil || !res.Clean() {
		// Leave the dirty bit as found: the refcounts are still suspect.
		img.mu.Lock()
		img.mu.dirtySet = false
		img.mu.Unlock()
	}
	if cerr := img.Close(); err == nil && cerr != nil {
		err = cerr
	}
	return res, err
}

// check walks the image; the caller must be the only user of img.
func (img *Image) check(mode RepairMode) (*CheckResult, error) {
	m := &img.mu
	m.Lock()
	defer m.Unlock()
	res := &CheckResult{TotalClusters: (img.size + img.cs - 1) >> img.cbits}
	fe := img.fileEnd.Load()
	n := (fe + img.cs - 1) >> img.cbits
	if n > maxCheckClusters {
		return nil, unsupported(-1, "file", "file of %d clusters is too large to check", n)
	}
	refs := make([]uint32, n)
	report := func(corruption bool, format string, args ...any) {
		if corruption {
			res.Corruptions++
		} else {
			res.Leaks++
		}
		if len(res.Problems) < maxProblems {
			p := "Leaked cluster "
			if corruption {
				p = "ERROR "
			}
			res.Problems = append(res.Problems, p+fmt.Sprintf(format, args...))
		}
	}
	inc := func(off, ln int64, what string) bool {
		if ln <= 0 {
			return true
		}
		if off < 0 || off+ln > n<<img.cbits {
			report(true, "%s at %#x+%d reaches past the end of the file (%d)", what, off, ln, fe)
			return false
		}
		for c := off >> img.cbits; c <= (off+ln-1)>>img.cbits; c++ {
			if refs[c] < ^uint32(0) {
				refs[c]++
			}
		}
		return true
	}
	type flagged struct {
		at     int64 // file offset of the entry
		entry  uint64
		target int64 // cluster index the entry points to
	}
	var copied []flagged
	// nextHost is where the next guest cluster would lie were the active
	// layer unfragmented: 0 until the first allocated cluster of an L2
	// table.
	var nextHost int64

	walk := func(l1 []uint64, l1off int64, active bool) error {
		raw := make([]byte, img.cs)
		for i, e := range l1 {
			off := int64(e & offsetMask)
			if off == 0 {
				continue
			}
			if e&l1Reserved != 0 || off&(img.cs-1) != 0 {
				report(true, "L1 entry %d (%#x) at %#x: reserved bits set or L2 offset not cluster-aligned", i, e, l1off+int64(i)*8)
				continue
			}
			if !inc(off, img.cs, "L2 table") {
				continue
			}
			if active {
				copied = append(copied, flagged{l1off + int64(i)*8, e, off >> img.cbits})
			}
			if err := hostfile.ReadFull(img.f, raw, off); err != nil {
				return fmt.Errorf("qcow2: check: read L2 table at %#x: %w", off, err)
			}
			// qemu-img check counts fragments within each L2 table.
			nextHost = 0
			for j := int64(0); j < img.cs/8; j++ {
				le := binary.BigEndian.Uint64(raw[j*8:])
				if le == 0 {
					continue
				}
				vc := int64(i)<<img.l2bits + j
				if le&entryCompressed != 0 {
					co, cn := img.compressedSpan(le)
					if co < img.cs {
						report(true, "compressed cluster of guest cluster %d at %#x overlaps the header", vc, co)
						continue
					}
					inc(co&^511, cn+co&511, "compressed cluster")
					if active {
						res.AllocatedClusters++
						res.CompressedClusters++
						res.FragmentedClusters++
					}
					continue
				}
				k, hoff, err := img.classify(le, vc)
				if err != nil && hoff == 0 {
					if e := le & offsetMask; e != 0 && le&0x3f000000000001fe == 0 && e&uint64(img.cs-1) == 0 {
						// classify refused an overlap with metadata; the
						// refcount comparison below reports it.
						k, hoff, err = kNormal, int64(e), nil
					}
				}
				if err != nil {
					report(true, "L2 entry for guest cluster %d (%#x) at %#x: %v", vc, le, off+j*8, err)
					continue
				}
				if hoff == 0 {
					continue
				}
				if !inc(hoff, img.cs, "data cluster") {
					// A power cut kept the L2 entry of an allocation but
					// not the data write that extended the file: no flush
					// covered that write, so nothing it held need survive.
					// Unmapping the cluster lets it read what it held
					// before (backing file or zeros). Only in a table of
					// the active layer that no snapshot shares.
					if mode == RepairAll && active && !img.ro && e&entryCopied != 0 && hoff > 0 {
						var z [8]byte
						if err := img.writeMeta(z[:], off+j*8, mL2); err != nil {
							return err
						}
						img.fixCachedEntryLocked(off+j*8, 0)
						res.CorruptionsFixed++
					}
					continue
				}
				if active {
					// A zero cluster that keeps its host cluster counts as
					// allocated, as in qemu-img check.
					if k == kNormal || k == kZero {
						res.AllocatedClusters++
						if nextHost != 0 && hoff != nextHost {
							res.FragmentedClusters++
						}
						nextHost = hoff + img.cs
					}
					copied = append(copied, flagged{off + j*8, le, hoff >> img.cbits})
				}
			}
		}
		return nil
	}

	inc(0, img.cs, "header")
	inc(int64(img.hdr.l1Offset), int64(len(m.l1))*8, "L1 table")
	if err := walk(m.l1, int64(img.hdr.l1Offset), true); err != nil {
		return nil, err
	}
	if len(img.snaps) > 0 {
		inc(int64(img.hdr.snapshotsOffset), img.snapLen, "snapshot table")
		for _, s := range img.snaps {
			if !inc(s.L1Offset, int64(s.L1Size)*8, "snapshot L1 table") {
				continue
			}
			raw := make([]byte, int64(s.L1Size)*8) // capped by readSnapshots
			if err := hostfile.ReadFull(img.f, raw, s.L1Offset); err != nil {
				return nil, fmt.Errorf("qcow2: check: read snapshot %q L1 table: %w", s.ID, err)
			}
			l1 := make([]uint64, s.L1Size)
			for i := range l1 {
				l1[i] = binary.BigEndian.Uint64(raw[i*8:])
			}
			if err := walk(l1, s.L1Offset, false); err != nil {
				return nil, err
			}
		}
	}
	if img.hdr.hasBitmaps && img.hdr.autoclear&1 != 0 {
		return nil, unsupported(-1, "bitmaps", "checking images with persistent dirty bitmaps is not supported")
	}
	inc(m.refOff, m.refClus*img.cs, "refcount table")
	badRange := map[int64]bool{}
	for r, e := range m.refTable {
		off := int64(e & offsetMask)
		if off == 0 {
			continue
		}
		if _, _, err := img.refblockLocked(int64(r)); err != nil {
			report(true, "refcount block %d: %v", r, err)
			badRange[int64(r)] = true
			continue
		}
		inc(off, img.cs, "refcount block")
	}

	if mode != RepairNone {
		m.usedRefs = refs
		defer func() { m.usedRefs = nil }()
	}
	// compare sets each stored refcount against the references counted
	// above, fixing what mode allows. As qemu-img check does, a first
	// pass fixes nothing: a referenced cluster with refcount 0 needs the
	// refcount structures rebuilt, which leaks-only repair must refuse
	// before it changes anything.
	compare := func(mode RepairMode, quiet bool) (rebuild bool, highest int64, err error) {
		highest = -1
		// Past the end of the file only ranges with a block of their own
		// can hold refcounts; a block shared by several table entries
		// (already a corruption) is scanned once, so the work stays
		// bounded by the file.
		limit := max(n, int64(len(m.refTable))<<img.rbBits)
		scanned := map[int64]bool{}
		for c := int64(0); c < limit; c++ {
			r := c >> img.rbBits
			if badRange[r] {
				c = (r+1)<<img.rbBits - 1
				continue
			}
			if c >= n && c&(1<<img.rbBits-1) == 0 || c == n {
				b, off, _ := img.refblockLocked(r)
				if b == nil || scanned[off] {
					c = (r+1)<<img.rbBits - 1
					continue
				}
				scanned[off] = true
			}
			stored, err := img.refcountLocked(c)
			if err != nil {
				return false, 0, err
			}
			var want uint64
			if c < n {
				want = uint64(refs[c])
			}
			if stored > 0 || want > 0 {
				highest = c
			}
			if stored == want {
				continue
			}
			if stored == 0 {
				rebuild = true
			}
			if quiet {
				continue
			}
			if stored > want {
				report(false, "%d refcount=%d reference=%d", c, stored, want)
				if mode != RepairNone {
					if err := img.setRefcountLocked(c, want); err != nil {
						return false, 0, err
					}
					res.LeaksFixed++
				}
				continue
			}
			report(true, "cluster %d refcount=%d reference=%d", c, stored, want)
			if mode == RepairAll {
				if err := img.setRefcountLocked(c, want); err != nil {
					return false, 0, err
				}
				res.CorruptionsFixed++
			}
		}
		return rebuild, highest, nil
	}
	rebuild, _, err := compare(RepairNone, true)
	if err != nil {
		return nil, err
	}
	if rebuild && mode == RepairLeaks {
		return nil, corrupt(-1, "refcount", "a cluster in use has refcount 0, so the refcount structures need rebuilding, which only -r all does")
	}
	_, highest, err := compare(mode, false)
	if err != nil {
		return nil, err
	}
	if res.LeaksFixed+res.CorruptionsFixed > 0 {
		// Report the end of the repaired image, as qemu's second look
		// after a repair does: freed leaks no longer count.
		if _, highest, err = compare(RepairNone, true); err != nil {
			return nil, err
		}
	}
	// qemu's image end: past the last cluster that is referenced or
	// counted, leaked ones included.
	res.ImageEndOffset = (highest + 1) << img.cbits

	for _, fl := range copied {
		if fl.target >= n || badRange[fl.target>>img.rbBits] {
			continue
		}
		// Against the stored refcount (after any repair above), as qemu
		// checks it: a wrong refcount of a cluster in use is then also a
		// wrong copied flag, counted twice as qemu counts it.
		stored, err := img.refcountLocked(fl.target)
		if err != nil {
			return nil, err
		}
		has := fl.entry&entryCopied != 0
		should := stored == 1
		if has == should {
			continue
		}
		report(true, "OFLAG_COPIED: entry %#x at %#x, refcount of cluster %d is %d", fl.entry, fl.at, fl.target, stored)
		if mode == RepairAll && !img.ro {
			e := fl.entry ^ entryCopied
			var b [8]byte
			binary.BigEndian.PutUint64(b[:], e)
			if err := img.writeMeta(b[:], fl.at, mL1|mL2); err != nil {
				return nil, err
			}
			img.fixCachedEntryLocked(fl.at, e)
			res.CorruptionsFixed++
		}
	}
	if !img.ro {
		if err := img.writeRefblocksLocked(); err != nil {
			return nil, err
		}
		if err := img.f.Sync(); err != nil {
			return nil, err
		}
	}
	return res, nil
}

// fixCachedEntryLocked mirrors an on-disk table entry fix in memory.
func (img *Image) fixCachedEntryLocked(at int64, e uint64) {
	m := &img.mu
	l1 := int64(img.hdr.l1Offset)
	if at >= l1 && at < l1+int64(len(m.l1))*8 {
		m.l1[(at-l1)/8] = e
		return
	}
	if t, ok := m.l2[at&^(img.cs-1)]; ok {
		t.e[(at&(img.cs-1))/8] = e
	}
}
