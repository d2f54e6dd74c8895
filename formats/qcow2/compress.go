package qcow2

import (
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
)

// WriteCompressed writes whole guest clusters compressed, the way `qemu-img
// convert -c` stores them (for `image convert -c`): raw deflate with the
// 4 KiB window qemu writes and reads, or zstd when the header says so,
// packed one after another into shared host clusters
// (reserveCompressedLocked). off must be cluster-aligned and p must end on
// a cluster boundary or at the end of the image. A cluster that does not
// shrink by at least a sector, or that already has a host cluster, is
// written plainly.
func (img *Image) WriteCompressed(p []byte, off int64) error {
	if img.ro {
		return image.ErrReadOnly
	}
	if err := image.CheckRange(off, len(p), img.size); err != nil {
		return err
	}
	end := off + int64(len(p))
	if off&(img.cs-1) != 0 || (end&(img.cs-1) != 0 && end != img.size) {
		return fmt.Errorf("qcow2: compressed write %d+%d is not whole clusters", off, len(p))
	}
	img.io.RLock()
	defer img.io.RUnlock()
	full := make([]byte, img.cs)
	zbuf := make([]byte, 0, img.cs)
	for pos := int64(0); pos < int64(len(p)); pos += img.cs {
		n := min(img.cs, int64(len(p))-pos)
		chunk := p[pos : pos+n]
		clear(full[copy(full, chunk):])
		zb, err := img.codec.compress(zbuf[:0], full)
		if err != nil {
			return err
		}
		var z []byte
		if int64(len(zb)) <= img.cs-512 {
			z = zb
		}
		if err := img.writeClusterZ((off+pos)>>img.cbits, 0, chunk, z); err != nil {
			return err
		}
	}
	return nil
}

// reserveCompressedLocked finds n bytes for a compressed cluster, packed
// after the previous one as qemu packs them: in the same host cluster,
// running on into the next one when that is the following cluster of the
// file, else from the start of a new cluster. Every host cluster the
// bytes touch counts one more reference (a new one from the pool already
// has its 1), and those counts are written before the data, so the sync
// that makes the data durable before the L2 entry names it covers them:
// a crash in between leaves a leak, never a refcount short of its users.
func (img *Image) reserveCompressedLocked(n int64) (int64, error) {
	m := &img.mu
	share := func(c int64) (bool, error) {
		rc, err := img.refcountLocked(c)
		if err != nil || rc == 0 || rc >= img.maxRefcount() {
			return false, err
		}
		b, boff, err := img.refblockLocked(c >> img.rbBits)
		if err != nil || b == nil {
			return false, err
		}
		_, wasDirty := m.dirtyRB[boff]
		if err := img.setRefcountLocked(c, rc+1); err != nil {
			return false, err
		}
		if wasDirty {
			return true, nil // the whole block goes out below
		}
		// Only this count changed: write its sector, not the block, or
		// every packed cluster would rewrite a whole refcount block.
		at := ((c & (1<<img.rbBits - 1)) << img.hdr.refcountOrder >> 3) &^ 511
		if err := img.writeMeta(b[at:at+512], boff+at, mRefBlock); err != nil {
			return false, err
		}
		delete(m.dirtyRB, boff)
		return true, nil
	}
	var off int64
	switch room := img.cs - m.zused; {
	case m.zc != 0 && n <= room:
		ok, err := share(m.zc)
		if err != nil {
			return 0, err
		}
		if ok {
			off = m.zc<<img.cbits + m.zused
			m.zused += n
			break
		}
		m.zc = 0
		fallthrough
	default:
		pc, err := img.takePoolLocked()
		if err != nil {
			return 0, err
		}
		ok := false
		if m.zc != 0 && room > 0 && pc.idx == m.zc+1 {
			if ok, err = share(m.zc); err != nil {
				m.pool = append(m.pool, pc)
				return 0, err
			}
		}
		if ok {
			off = m.zc<<img.cbits + m.zused
			m.zc, m.zused = pc.idx, n-room
		} else {
			off = pc.idx << img.cbits
			m.zc, m.zused = pc.idx, n
		}
	}
	return off, img.writeRefblocksLocked()
}

// allocWriteCompressed stores z at off, reserved for it, and links a
// compressed descriptor for guest cluster vc (whose entry was e).
func (img *Image) allocWriteCompressed(vc int64, z []byte, e uint64, off int64) error {
	x := 62 - (img.cbits - 8)
	extra := uint64((off+int64(len(z))-1)>>9 - off>>9)
	ne := entryCompressed | extra<<x | uint64(off)
	var err error
	if uint64(off) >= uint64(1)<<x {
		err = unsupported(-1, "l2_entry", "host offset %#x too large for a compressed descriptor", off)
	} else {
		// Stale bytes around z in a reused cluster are never read: the
		// descriptor bounds the data. Until z is durable the entry would
		// name bytes that do not decompress.
		err = img.writeData(z, off)
		if err == nil && !img.scratch {
			err = img.gsync.Sync(img.f.Sync)
		}
	}
	m := &img.mu
	m.Lock()
	defer m.Unlock()
	if err != nil {
		// Give back the references taken for z: a leak otherwise.
		img.dropLocked(ne)
		return err
	}
	return img.linkLocked(vc, ne, e)
}
