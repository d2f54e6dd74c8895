package qcow2

import (
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
)

// WriteCompressed writes whole guest clusters compressed, the way `qemu-img
// convert -c` stores them (for `image convert -c`): raw deflate with a
// 4 KiB window, which is all qemu's inflate accepts, or zstd when the
// header says so. off must be cluster-aligned and p must end on a cluster
// boundary or at the end of the image. A cluster that does not shrink by
// at least a sector, or that already has a host cluster, is written
// plainly.
//
// Each compressed cluster gets a host cluster of its own and only
// its compressed bytes are written: the rest stays a hole in the file.
// The saving is in disk blocks, not in apparent file length, and
// refcounts stay one per cluster, so the crash ordering of plain writes
// applies unchanged.
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

// allocWriteCompressed stores z in the new host cluster pc and links a
// compressed descriptor for guest cluster vc (whose entry was e).
func (img *Image) allocWriteCompressed(vc int64, z []byte, e uint64, pc poolCluster) error {
	newOff := pc.idx << img.cbits
	x := 62 - (img.cbits - 8)
	var err error
	if uint64(newOff) >= uint64(1)<<x {
		err = unsupported(-1, "l2_entry", "host offset %#x too large for a compressed descriptor", newOff)
	} else {
		// Stale bytes after z in a reused cluster are never read: the
		// descriptor bounds the data. Until z is durable the entry would
		// name bytes that do not inflate.
		err = img.writeData(z, newOff)
		if err == nil && !img.scratch {
			err = img.gsync.Sync(img.f.Sync)
		}
	}
	m := &img.mu
	m.Lock()
	defer m.Unlock()
	if err != nil {
		pc.fresh = false
		m.pool = append(m.pool, pc)
		return err
	}
	extra := uint64((newOff+int64(len(z))-1)>>9 - newOff>>9)
	return img.linkLocked(vc, entryCompressed|extra<<x|uint64(newOff), e)
}
