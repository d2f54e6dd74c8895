package vhd

// Growing a dynamic disk past the blocks its BAT can name. The BAT (and
// the batmap, which libvhd looks for right behind it) cannot grow in
// place: the blocks follow them. So a new BAT and batmap are laid out
// where the metadata ends, after the blocks there have been moved to the
// end of the file, and one header write switches to them:
//
//  1. each block in the way: copied to the end, a footer after it  } fdatasync
//     then its entry in the old BAT switched                      } fdatasync
//  2. the new BAT and batmap, in space nothing references           } fdatasync
//  3. the header: the new table offset and entry count              } fdatasync
//
// Before 3 the old header names the old BAT and batmap, untouched; after
// it the new ones, complete. The old tables' space stays behind as part
// of the metadata (nothing may sit between metadata and blocks). The
// caller then writes the footers with the new size.

import (
	"encoding/binary"
	"fmt"

	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// growTables gives the BAT room for entries blocks (more than it has).
func (img *Image) growTables(entries int64) error {
	if entries > maxBATEntries {
		return fmt.Errorf("vhd: %s: %d blocks exceed the BAT cap %d", img.path, entries, maxBATEntries)
	}
	at := int64(0)
	for _, r := range img.metaRegions() {
		at = max(at, roundUp(r.off+r.n, sectorSize))
	}
	batBytes := roundUp(4*entries, sectorSize)
	bmSecs := int64(0)
	end := at + batBytes
	if img.batmap.present {
		bmSecs = (entries + 8*sectorSize - 1) / (8 * sectorSize)
		end += sectorSize + bmSecs*sectorSize
	}
	if err := img.moveBlocksBelow(end); err != nil {
		return err
	}
	if img.nextFree < end {
		// The footer sits where the tables go: it moves past them first.
		if err := img.writeFooterLocked(end); err != nil {
			return err
		}
		if err := img.f.Sync(); err != nil {
			return err
		}
	}
	raw := make([]byte, batBytes)
	for i := range raw {
		raw[i] = 0xFF
	}
	img.mu.RLock()
	for i, e := range img.bat {
		binary.BigEndian.PutUint32(raw[4*i:], e)
	}
	img.mu.RUnlock()
	if err := hostfile.WriteFull(img.f, raw, at); err != nil {
		return fmt.Errorf("vhd: write the new BAT: %w", err)
	}
	old := img.batmap
	if img.batmap.present {
		if err := img.placeBatmap(at+batBytes, bmSecs); err != nil {
			img.batmap = old
			return err
		}
	}
	if err := img.f.Sync(); err != nil {
		img.batmap = old
		return err
	}
	h := *img.hdr
	h.TableOffset, h.MaxEntries = uint64(at), uint32(entries)
	if err := img.writeHeaderSynced(&h); err != nil {
		img.batmap = old
		return err
	}
	img.hdr = &h
	img.mu.Lock()
	for int64(len(img.bat)) < entries {
		img.bat = append(img.bat, batUnused)
	}
	img.mu.Unlock()
	return nil
}

// placeBatmap writes a batmap of secs sectors with its header at hdrOff,
// keeping the bits of a valid one (a block marked full stays so) and
// starting all clear otherwise, which libvhd always accepts.
func (img *Image) placeBatmap(hdrOff, secs int64) error {
	bits := make([]byte, secs*sectorSize)
	version := uint32(batmapVersion)
	if img.batmap.valid {
		copy(bits, img.batmap.bits)
		version = img.batmap.version
	}
	bm := &img.batmap
	bm.hdrOff, bm.off, bm.sectors, bm.version, bm.bits = hdrOff, hdrOff+sectorSize, uint32(secs), version, bits
	bm.valid = true
	return img.writeBatmapLocked()
}

// moveBlocksBelow moves every block that starts before end to the end of
// the file, each switched in the (old) BAT only once its copy is durable.
func (img *Image) moveBlocksBelow(end int64) error {
	per := img.bmSize + img.blockSize
	buf := make([]byte, per)
	for blk := range int64(len(img.bat)) {
		img.mu.RLock()
		e := img.bat[blk]
		img.mu.RUnlock()
		if e == batUnused || int64(e)*sectorSize >= end {
			continue
		}
		pos := max(img.nextFree, end)
		if (pos+per)/sectorSize >= batUnused {
			return fmt.Errorf("vhd: %s: no room to move block %d: a VHD file cannot grow past 2 TiB", img.path, blk)
		}
		if err := hostfile.ReadFull(img.f, buf, int64(e)*sectorSize); err != nil {
			return fmt.Errorf("vhd: read block %d: %w", blk, err)
		}
		if err := hostfile.WriteFull(img.f, buf, pos); err != nil {
			return fmt.Errorf("vhd: copy block %d: %w", blk, err)
		}
		if err := img.writeFooterLocked(pos + per); err != nil {
			return err
		}
		if err := img.f.Sync(); err != nil {
			return err
		}
		var ent [4]byte
		binary.BigEndian.PutUint32(ent[:], uint32(pos/sectorSize))
		if err := hostfile.WriteFull(img.f, ent[:], int64(img.hdr.TableOffset)+4*blk); err != nil {
			return fmt.Errorf("vhd: BAT entry %d: %w", blk, err)
		}
		if err := img.f.Sync(); err != nil {
			return err
		}
		img.mu.Lock()
		img.bat[blk] = uint32(pos / sectorSize)
		img.mu.Unlock()
	}
	return nil
}
