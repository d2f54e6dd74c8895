package vhd

import (
	"encoding/binary"
	"fmt"

	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// repairBatmap gives back the batmap that creator tap >= 1.2 implies
// when a writer that knows none (qemu) allocated a block over it: each
// such block is copied to the end of the file and its BAT entry moved
// (the same order as an allocation: copy + footer, sync, BAT, sync),
// then an all-clear batmap is written. It returns what it did.
func (img *Image) repairBatmap() ([]string, error) {
	if img.ro || img.hdr == nil || !img.batmap.present || img.batmap.valid {
		return nil, nil
	}
	img.allocMu.Lock()
	defer img.allocMu.Unlock()
	var did []string
	entries := int64(len(img.bat))
	hdrOff := int64(img.hdr.TableOffset) + roundUp(4*entries, sectorSize)
	mapSecs := (entries + 8*sectorSize - 1) / (8 * sectorSize)
	regionEnd := hdrOff + sectorSize + mapSecs*sectorSize
	per := img.bmSize + img.blockSize
	for blk, e := range img.bat {
		start := int64(e) * sectorSize
		if e == batUnused || start >= regionEnd || start+per <= hdrOff {
			continue
		}
		buf := make([]byte, per)
		if err := hostfile.ReadFull(img.f, buf, start); err != nil {
			return did, fmt.Errorf("vhd: repair: read block %d: %w", blk, err)
		}
		pos := img.nextFree
		if err := hostfile.WriteFull(img.f, buf, pos); err != nil {
			return did, fmt.Errorf("vhd: repair: copy block %d: %w", blk, err)
		}
		if err := img.writeFooterLocked(pos + per); err != nil {
			return did, err
		}
		if err := img.f.Sync(); err != nil {
			return did, err
		}
		var ent [4]byte
		binary.BigEndian.PutUint32(ent[:], uint32(pos/sectorSize))
		if err := hostfile.WriteFull(img.f, ent[:], int64(img.hdr.TableOffset)+4*int64(blk)); err != nil {
			return did, err
		}
		if err := img.f.Sync(); err != nil {
			return did, err
		}
		img.mu.Lock()
		img.bat[blk] = uint32(pos / sectorSize)
		img.mu.Unlock()
		did = append(did, fmt.Sprintf("block %d moved from %d to %d, off the batmap", blk, start, pos))
	}
	img.batmap.hdrOff = hdrOff
	img.batmap.off = hdrOff + sectorSize
	img.batmap.sectors = uint32(mapSecs)
	img.batmap.version = batmapVersion
	img.batmap.bits = make([]byte, mapSecs*sectorSize)
	if err := img.writeBatmapLocked(); err != nil {
		return did, err
	}
	if err := img.f.Sync(); err != nil {
		return did, err
	}
	img.batmap.valid = true
	return append(did, fmt.Sprintf("batmap rewritten at %d (all clear)", hdrOff)), nil
}
