package qcow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

func alignUp(v, a int64) int64 { return (v + a - 1) &^ (a - 1) }

// l1End is the first byte after the L1 table: no data cluster of a sound
// image lies before it, so writing in place there would destroy metadata.
func (img *Image) l1End() uint64 { return img.h.l1Offset + uint64(img.h.l1Entries)*8 }

// checkWritable refuses to write n clusters in place at host unless they
// lie between the L1 table and the end of the file: an entry pointing
// elsewhere is corrupt, and following it would destroy metadata or grow the
// file by whatever the entry claims.
func (img *Image) checkWritable(vc int64, host uint64, n int64) error {
	img.mu.Lock()
	defer img.mu.Unlock()
	eof := img.mu.eof
	if host < img.l1End() || host > uint64(eof) || uint64(n*img.h.clusterSize) > uint64(eof)-host {
		return corrupt(-1, "l2 entry", "cluster %d maps to %#x, outside the data area of the %d-byte file", vc, host, eof)
	}
	return img.refuseOverlapLocked(vc, host, uint64(n*img.h.clusterSize), "write")
}

// WriteAt writes p at virtual offset off. Clusters already allocated are
// written in place without any lock; the others take the allocation path
// (see the package doc for its ordering).
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	if err := img.checkOpen(); err != nil {
		return 0, err
	}
	if img.ro {
		return 0, image.ErrReadOnly
	}
	if err := image.CheckRange(off, len(p), img.Size()); err != nil {
		return 0, err
	}
	if err := img.brokenErr(); err != nil {
		return 0, err
	}
	return img.eachRun(off, len(p), "write", func(r span) error {
		if r.kind != runData {
			return img.allocWrite(p[r.lo:r.hi], r.pos)
		}
		if err := img.checkWritable(r.vc, r.host, r.n); err != nil {
			return err
		}
		return hostfile.WriteFull(img.st, p[r.lo:r.hi], int64(r.host)+r.in)
	})
}

// clusterPlan is what the allocation path does with one virtual cluster.
type clusterPlan struct {
	vc      int64
	old     uint64 // the entry before: 0 or a compressed cluster
	host    uint64 // where the cluster's data goes
	inPlace bool   // already allocated (by a writer that ran first)
	l2off   uint64 // the existing L2 table holding its entry, 0 if new
}

type newTable struct {
	l1i     int64
	off     uint64
	entries []uint64
}

type segment struct {
	host uint64
	data []byte
	pOff int // offset of data in the caller's buffer, -1 if a private buffer
}

// allocWrite writes p at pos, allocating every cluster it touches that is
// unallocated or compressed. Order: data (and new L2 tables) appended at
// EOF, fdatasync, then the entries in existing L2 tables and the L1
// entries of new tables.
func (img *Image) allocWrite(p []byte, pos int64) error {
	h := img.h
	vc0, vcN := pos>>h.clusterBits, (pos+int64(len(p))-1)>>h.clusterBits

	plans, tables, done, err := img.planAlloc(vc0, vcN)
	if err != nil {
		return err
	}
	defer img.release(plans, tables, done)

	// 1. Data, then the new L2 tables: they are unreachable until their
	// L1 entry is written, so they go out with the data, before the barrier.
	if err := img.writeAllocData(p, pos, plans); err != nil {
		return err
	}
	if err := img.writeNewTables(plans, tables); err != nil {
		return err
	}
	// 2. Barrier: nothing may point at data that is not durable.
	if err := img.barrier(); err != nil {
		return err
	}
	// 3. Entries in existing L2 tables.
	if err := img.writeL2Entries(plans); err != nil {
		return err
	}
	// 4. L1 entries of new tables, in the image's L1 byte order.
	var e8 [8]byte
	for _, t := range tables {
		h.l1Order().PutUint64(e8[:], t.off)
		if err := hostfile.WriteFull(img.st, e8[:], int64(h.l1Offset)+t.l1i*8); err != nil {
			return err
		}
	}
	// 5. Memory, last: readers see the new clusters only once they are in
	// the file.
	img.publishAlloc(plans, tables)
	return nil
}

// writeAllocData writes p's clusters where the plans put them, merging
// neighbours in file and buffer into one write; a partly written new
// cluster is filled from what it replaces (cowFill).
func (img *Image) writeAllocData(p []byte, pos int64, plans []clusterPlan) error {
	cs := img.h.clusterSize
	var segs []segment
	add := func(s segment) {
		if n := len(segs); n > 0 {
			last := &segs[n-1]
			if last.pOff >= 0 && s.pOff == last.pOff+len(last.data) &&
				last.host+uint64(len(last.data)) == s.host {
				last.data = p[last.pOff : s.pOff+len(s.data)]
				return
			}
		}
		segs = append(segs, s)
	}
	end := pos + int64(len(p))
	for _, pl := range plans {
		cStart := pl.vc * cs
		lo, hi := max(pos, cStart), min(end, cStart+cs)
		src := p[lo-pos : hi-pos]
		switch {
		case pl.inPlace:
			if err := img.checkWritable(pl.vc, pl.host, 1); err != nil {
				return err
			}
			add(segment{host: pl.host + uint64(lo-cStart), data: src, pOff: int(lo - pos)})
		case lo == cStart && hi == cStart+cs:
			add(segment{host: pl.host, data: src, pOff: int(lo - pos)})
		default:
			buf, err := img.cowFill(pl, cStart)
			if err != nil {
				return err
			}
			copy(buf[lo-cStart:], src)
			add(segment{host: pl.host, data: buf, pOff: -1})
		}
	}
	for _, s := range segs {
		if err := hostfile.WriteFull(img.st, s.data, int64(s.host)); err != nil {
			return err
		}
	}
	return nil
}

// writeNewTables writes each new L2 table whole, holding the entries of
// the clusters planned under it.
func (img *Image) writeNewTables(plans []clusterPlan, tables []*newTable) error {
	h := img.h
	for _, t := range tables {
		for _, pl := range plans {
			if !pl.inPlace && pl.vc>>h.l2Bits == t.l1i {
				t.entries[pl.vc&(h.l2Entries-1)] = pl.host
			}
		}
		raw := make([]byte, h.l2TableBytes)
		for i, e := range t.entries {
			binary.BigEndian.PutUint64(raw[i*8:], e)
		}
		if err := hostfile.WriteFull(img.st, raw, int64(t.off)); err != nil {
			return err
		}
	}
	return nil
}

// writeL2Entries points existing L2 tables at the new clusters, a run of
// neighbouring entries in one write.
func (img *Image) writeL2Entries(plans []clusterPlan) error {
	h := img.h
	for i := 0; i < len(plans); {
		pl := plans[i]
		if pl.inPlace || pl.l2off == 0 {
			i++
			continue
		}
		j := i + 1
		for j < len(plans) && !plans[j].inPlace && plans[j].l2off == pl.l2off && plans[j].vc == plans[j-1].vc+1 {
			j++
		}
		raw := make([]byte, (j-i)*8)
		for k := i; k < j; k++ {
			binary.BigEndian.PutUint64(raw[(k-i)*8:], plans[k].host)
		}
		if err := hostfile.WriteFull(img.st, raw, int64(pl.l2off)+(pl.vc&(h.l2Entries-1))*8); err != nil {
			return err
		}
		i = j
	}
	return nil
}

// publishAlloc makes the new clusters and tables visible to readers.
func (img *Image) publishAlloc(plans []clusterPlan, tables []*newTable) {
	h := img.h
	img.mu.Lock()
	defer img.mu.Unlock()
	for _, pl := range plans {
		if pl.inPlace || pl.l2off == 0 {
			continue
		}
		if t, ok := img.mu.l2[pl.l2off]; ok {
			t[pl.vc&(h.l2Entries-1)] = pl.host
		}
	}
	for _, t := range tables {
		img.mu.l1[t.l1i] = t.off
		img.cacheL2Locked(t.off, t.entries)
	}
}

// planAlloc claims what writing virtual clusters [vc0, vcN] needs: space
// at EOF for each unallocated or compressed cluster and for each missing L2
// table, and busy marks on those clusters and tables. If another operation
// holds a mark it needs, it waits for that to end and plans again.
func (img *Image) planAlloc(vc0, vcN int64) ([]clusterPlan, []*newTable, chan struct{}, error) {
	h := img.h
	cs := h.clusterSize
	for {
		img.mu.Lock()
		var wait chan struct{}
		for vc := vc0; vc <= vcN && wait == nil; vc++ {
			wait = img.mu.busy[vc]
			if l1i := vc >> h.l2Bits; wait == nil && img.mu.l1[l1i] == 0 {
				wait = img.mu.newL2[l1i]
			}
		}
		if wait != nil {
			img.mu.Unlock()
			<-wait
			continue
		}
		plans := make([]clusterPlan, 0, vcN-vc0+1)
		var tables []*newTable
		eof := img.mu.eof
		for vc := vc0; vc <= vcN; vc++ {
			e, err := img.entryLocked(vc)
			if err != nil {
				img.mu.Unlock()
				return nil, nil, nil, err
			}
			if e != 0 && e&flagCompressed == 0 {
				plans = append(plans, clusterPlan{vc: vc, host: e, inPlace: true})
				continue
			}
			l1i := vc >> h.l2Bits
			l2off := img.mu.l1[l1i]
			if l2off == 0 && (len(tables) == 0 || tables[len(tables)-1].l1i != l1i) {
				off := alignUp(eof, cs)
				eof = off + h.l2TableBytes
				tables = append(tables, &newTable{l1i: l1i, off: uint64(off), entries: make([]uint64, h.l2Entries)})
				img.addL2Locked(uint64(off))
			}
			host := alignUp(eof, cs)
			eof = host + cs
			plans = append(plans, clusterPlan{vc: vc, old: e, host: uint64(host), l2off: l2off})
		}
		img.mu.eof = eof // space is claimed now; on failure it only leaks
		done := make(chan struct{})
		for _, pl := range plans {
			if !pl.inPlace {
				img.mu.busy[pl.vc] = done
			}
		}
		for _, t := range tables {
			img.mu.newL2[t.l1i] = done
		}
		img.mu.Unlock()
		return plans, tables, done, nil
	}
}

// release drops planAlloc's marks and wakes whoever waits on them.
func (img *Image) release(plans []clusterPlan, tables []*newTable, done chan struct{}) {
	img.mu.Lock()
	for _, pl := range plans {
		if !pl.inPlace {
			delete(img.mu.busy, pl.vc)
		}
	}
	for _, t := range tables {
		delete(img.mu.newL2, t.l1i)
	}
	img.mu.Unlock()
	close(done)
}

// cowFill returns a whole cluster holding what the cluster read as before
// this write: the decompressed cluster, else the backing image's data.
func (img *Image) cowFill(pl clusterPlan, cStart int64) ([]byte, error) {
	if pl.old&flagCompressed != 0 {
		return img.decompress(pl.old)
	}
	buf := make([]byte, img.h.clusterSize)
	n := min(img.h.clusterSize, img.Size()-cStart)
	if err := img.readBacking(buf[:n], cStart); err != nil {
		return nil, err
	}
	return buf, nil
}

// zeroChunk is the largest run of zeros Discard writes at once.
const zeroChunk = 1 << 20

// Discard makes [off, off+length) read as zeros. Without a backing file,
// whole clusters are deallocated (their L2 entries cleared, then their
// space punched out of the file) and partial clusters are zeroed. With a
// backing file, deallocating would expose the backing data, so the range
// is written with zeros.
func (img *Image) Discard(off, length int64) error {
	if err := img.checkOpen(); err != nil {
		return err
	}
	if img.ro {
		return image.ErrReadOnly
	}
	if off < 0 || length < 0 || off > img.Size() || length > img.Size()-off {
		return fmt.Errorf("%w: discard offset %d length %d size %d", image.ErrOutOfRange, off, length, img.Size())
	}
	if length == 0 {
		return nil
	}
	if err := img.brokenErr(); err != nil {
		return err
	}
	cs := img.h.clusterSize
	end := off + length
	first, last := alignUp(off, cs), end&^(cs-1)
	if img.backing != nil || first >= last {
		return img.writeZeros(off, end)
	}
	if err := img.zeroIfAllocated(off, first); err != nil {
		return err
	}
	if err := img.zeroIfAllocated(last, end); err != nil {
		return err
	}
	return img.deallocate(first>>img.h.clusterBits, last>>img.h.clusterBits)
}

func (img *Image) writeZeros(from, to int64) error {
	zeros := make([]byte, min(zeroChunk, to-from))
	for from < to {
		n := min(int64(len(zeros)), to-from)
		if _, err := img.WriteAt(zeros[:n], from); err != nil {
			return err
		}
		from += n
	}
	return nil
}

// zeroIfAllocated zeroes [from, to) inside one cluster unless it is
// unallocated (and so already reads as zeros: there is no backing file).
func (img *Image) zeroIfAllocated(from, to int64) error {
	if from >= to {
		return nil
	}
	kind, _, _, err := img.resolve(from>>img.h.clusterBits, 1)
	if err != nil || kind == runUnalloc {
		return err
	}
	return img.writeZeros(from, to)
}

// deallocate clears the L2 entries of virtual clusters [vc0, vcN) and
// punches their data out of the file.
// freedCluster is an allocated cluster a discard unmaps: its virtual
// cluster, the L2 table holding its entry, and the entry.
type freedCluster struct {
	vc, l2off int64
	host      uint64
}

func (img *Image) deallocate(vc0, vcN int64) error {
	h := img.h
	done := make(chan struct{})
	defer close(done)
	fr, err := img.claimFreed(vc0, vcN, done)
	if err != nil {
		return err
	}
	defer func() {
		img.mu.Lock()
		for _, f := range fr {
			delete(img.mu.busy, f.vc)
		}
		img.mu.Unlock()
	}()

	var zero [8]byte
	for _, f := range fr {
		if err := hostfile.WriteFull(img.st, zero[:], f.l2off+(f.vc&(h.l2Entries-1))*8); err != nil {
			return err
		}
	}
	img.mu.Lock()
	for _, f := range fr {
		if t, ok := img.mu.l2[uint64(f.l2off)]; ok {
			t[f.vc&(h.l2Entries-1)] = 0
		}
	}
	img.mu.Unlock()
	// Punch after the entries are cleared: if a crash keeps the punch but
	// loses an entry, that entry points at a hole, which reads as zeros
	// too, and freed space is never handed out again (allocation only
	// appends). Over a backing file (MakeEmpty) a cleared entry reads the
	// backing file's data, not zeros, so the entries are made durable
	// before the first punch.
	if img.backing != nil {
		if err := img.barrier(); err != nil {
			return err
		}
	}
	return img.punchFreed(fr)
}

// claimFreed waits until no write is allocating in [vc0, vcN), then
// marks the range's allocated clusters busy with done and returns them.
func (img *Image) claimFreed(vc0, vcN int64, done chan struct{}) ([]freedCluster, error) {
	for {
		img.mu.Lock()
		var wait chan struct{}
		for vc := range img.mu.busy {
			if vc >= vc0 && vc < vcN {
				wait = img.mu.busy[vc]
				break
			}
		}
		if wait != nil {
			img.mu.Unlock()
			<-wait
			continue
		}
		fr, err := img.allocatedLocked(vc0, vcN)
		if err == nil {
			for _, f := range fr {
				img.mu.busy[f.vc] = done
			}
		}
		img.mu.Unlock()
		return fr, err
	}
}

// allocatedLocked lists the allocated clusters of [vc0, vcN), refusing
// any whose space overlaps metadata (it is punched later).
func (img *Image) allocatedLocked(vc0, vcN int64) ([]freedCluster, error) {
	h := img.h
	var fr []freedCluster
	for vc := vc0; vc < vcN; {
		l1i := vc >> h.l2Bits
		l2off := img.mu.l1[l1i]
		tableEnd := (l1i + 1) << h.l2Bits
		if l2off == 0 {
			vc = tableEnd
			continue
		}
		t, err := img.l2Locked(l2off)
		if err != nil {
			return nil, err
		}
		for ; vc < vcN && vc < tableEnd; vc++ {
			e := t[vc&(h.l2Entries-1)]
			if e == 0 {
				continue
			}
			if e&flagCompressed == 0 && e >= img.l1End() {
				// Its space is punched later: never through metadata.
				if err := img.refuseOverlapLocked(vc, e, uint64(h.clusterSize), "discard"); err != nil {
					return nil, err
				}
			}
			fr = append(fr, freedCluster{vc: vc, l2off: int64(l2off), host: e})
		}
	}
	return fr, nil
}

// punchFreed gives the freed clusters' space back, a run of neighbours
// in one punch. Compressed clusters share their space and stay.
func (img *Image) punchFreed(fr []freedCluster) error {
	hosts := make([]uint64, 0, len(fr))
	for _, f := range fr {
		if f.host&flagCompressed == 0 && f.host >= img.l1End() {
			hosts = append(hosts, f.host)
		}
	}
	slices.Sort(hosts)
	cs := uint64(img.h.clusterSize)
	for i := 0; i < len(hosts); {
		j := i + 1
		for j < len(hosts) && hosts[j] == hosts[j-1]+cs {
			j++
		}
		err := img.st.PunchHole(int64(hosts[i]), int64(uint64(j-i)*cs))
		if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
			err = nil // the range already reads as zeros through the L2 entry; space is merely kept
		}
		if err != nil {
			return fmt.Errorf("qcow: punching freed clusters: %w", err)
		}
		i = j
	}
	return nil
}
