package vhd

// Emptying a differencing disk after `image commit` (vhd-util coalesce
// leaves the child as it is; qemu-img commit empties the overlay, and we
// do the same). The caller has written every sector this disk holds into
// its parent and flushed the parent, so a block reads the same whether
// its BAT entry still names it or reads through: each entry may flip at
// any moment of a crash and the content stays put.

import (
	"encoding/binary"
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// CanEmpty says whether MakeEmpty can be done, before a commit writes
// anything: only a differencing disk opened over its parent can read
// through to it.
func (img *Image) CanEmpty() error {
	if img.foot.Type != typeDiff || img.noParent {
		return fmt.Errorf("vhd: %s: %w: only a differencing disk opened with its parent can be emptied", img.path, image.ErrUnsupported)
	}
	return nil
}

// MakeEmpty marks every block unallocated, so the disk reads its parent
// through, in this order:
//
//  1. the batmap's bits for those blocks cleared     } fdatasync
//  2. the BAT entries reset, in one write            } fdatasync
//  3. the blocks' space punched out of the file      } fdatasync
//
// A stale clear batmap bit only costs libvhd a bitmap read, so 1 goes
// first; 3 waits for 2 to be durable, since a punched block that a BAT
// entry still names would read zeros. The space stays in the file (the
// footer does not move): check reports it as leaked.
func (img *Image) MakeEmpty() error {
	unlock, err := img.exclusive()
	if err != nil {
		return err
	}
	defer unlock()
	if err := img.CanEmpty(); err != nil {
		return err
	}
	img.mu.RLock()
	var blocks []int64
	for i, e := range img.bat {
		if e != batUnused {
			blocks = append(blocks, int64(i))
		}
	}
	img.mu.RUnlock()
	if len(blocks) == 0 {
		return nil
	}
	if err := img.clearBatmapBits(blocks); err != nil {
		return err
	}
	old := make([]uint32, len(blocks))
	if err := img.unmapBlocks(blocks, old); err != nil {
		return err
	}
	per := img.bmSize + img.blockSize
	for _, e := range old {
		// Best effort: space not punched is only leaked.
		if err := img.f.PunchHole(int64(e)*sectorSize, per); err != nil {
			break
		}
	}
	return img.f.Sync()
}

// clearBatmapBits clears blocks' "fully allocated" bits in a valid
// batmap and syncs, when any was set.
func (img *Image) clearBatmapBits(blocks []int64) error {
	if !img.batmap.valid {
		return nil
	}
	changed := false
	for _, b := range blocks {
		if img.batmap.bits[b>>3]&(0x80>>(b&7)) != 0 {
			img.batmap.bits[b>>3] &^= 0x80 >> (b & 7)
			changed = true
		}
	}
	if !changed {
		return nil
	}
	if err := img.writeBatmapLocked(); err != nil {
		return err
	}
	return img.f.Sync()
}

// unmapBlocks resets blocks' BAT entries on disk (the sectors holding
// them, in one write), syncs, and only then forgets them in memory; old
// receives the entries they held.
func (img *Image) unmapBlocks(blocks []int64, old []uint32) error {
	first, last := blocks[0]*4/sectorSize, blocks[len(blocks)-1]*4/sectorSize
	raw := make([]byte, (last-first+1)*sectorSize)
	img.mu.RLock()
	const perSector = sectorSize / 4
	for j := first * perSector; j < min((last+1)*perSector, int64(len(img.bat))); j++ {
		binary.BigEndian.PutUint32(raw[4*(j-first*perSector):], img.bat[j])
	}
	img.mu.RUnlock()
	for i, b := range blocks {
		old[i] = binary.BigEndian.Uint32(raw[b*4-first*sectorSize:])
		binary.BigEndian.PutUint32(raw[b*4-first*sectorSize:], batUnused)
	}
	// The BAT's last sector may be partly past its entries: keep the
	// bytes there as the file has them.
	tail := int64(img.hdr.TableOffset) + 4*int64(len(img.bat))
	at := int64(img.hdr.TableOffset) + first*sectorSize
	if end := at + int64(len(raw)); end > tail {
		if err := hostfile.ReadFull(img.f, raw[tail-at:], tail); err != nil {
			return fmt.Errorf("vhd: read BAT: %w", err)
		}
	}
	if err := hostfile.WriteFull(img.f, raw, at); err != nil {
		return fmt.Errorf("vhd: write BAT: %w", err)
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	img.mu.Lock()
	for _, b := range blocks {
		img.bat[b] = batUnused
		delete(img.bmCache, uint32(b))
	}
	img.mu.Unlock()
	return nil
}
