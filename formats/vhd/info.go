package vhd

import (
	"fmt"
	"strings"
	"time"
)

// Geometry is the CHS geometry stored in the footer.
type Geometry struct {
	Cylinders       int `json:"cylinders"`
	Heads           int `json:"heads"`
	SectorsPerTrack int `json:"sectors_per_track"`
}

// Info is what `image info` prints for a VHD.
type Info struct {
	Format          string    `json:"format"`    // "vhd"
	Subformat       string    `json:"subformat"` // fixed | dynamic | differencing
	VirtualSize     int64     `json:"virtual_size"`
	SizeFrom        string    `json:"size_from"` // current_size | geometry (qemu's rule)
	CurrentSize     uint64    `json:"current_size"`
	OriginalSize    uint64    `json:"original_size"`
	Geometry        Geometry  `json:"geometry"`
	BlockSize       int64     `json:"block_size,omitempty"`
	BATEntries      int       `json:"bat_entries,omitempty"`
	AllocatedBlocks int       `json:"allocated_blocks,omitempty"`
	CreatorApp      string    `json:"creator_app"`
	CreatorVersion  string    `json:"creator_version"`
	CreatorOS       string    `json:"creator_os"`
	Timestamp       time.Time `json:"timestamp"`
	UUID            string    `json:"uuid"`
	SavedState      bool      `json:"saved_state"`
	Hidden          bool      `json:"hidden"`
	Batmap          bool      `json:"batmap"`
	BackingFile     string    `json:"backing_file,omitempty"`
	BackingFormat   string    `json:"backing_format,omitempty"`
	ParentUUID      string    `json:"parent_uuid,omitempty"`
	ParentTimestamp time.Time `json:"parent_timestamp,omitzero"`
	ParentLocators  []Locator `json:"parent_locators,omitempty"`
	Warnings        []string  `json:"warnings,omitempty"`
}

func fourCC(b [4]byte) string {
	var sb strings.Builder
	for _, c := range b {
		if c >= 0x20 && c < 0x7f {
			sb.WriteByte(c)
		} else if c != 0 {
			fmt.Fprintf(&sb, "\\x%02x", c)
		}
	}
	return sb.String()
}

// Info describes the open image.
func (img *Image) Info() Info {
	ft := img.foot
	in := Info{
		Format:         "vhd",
		VirtualSize:    img.size,
		SizeFrom:       img.sizeFrom,
		CurrentSize:    ft.CurrentSize,
		OriginalSize:   ft.OrigSize,
		Geometry:       Geometry{int(ft.Cylinders), int(ft.Heads), int(ft.SPT)},
		CreatorApp:     fourCC(ft.CreatorApp),
		CreatorVersion: fmt.Sprintf("%d.%d", ft.CreatorVer>>16, ft.CreatorVer&0xffff),
		Timestamp:      vhdEpoch.Add(time.Duration(ft.Timestamp) * time.Second),
		UUID:           fmtUUID(ft.UUID),
		SavedState:     ft.SavedState != 0,
		Hidden:         ft.Hidden != 0,
		Warnings:       append([]string(nil), img.warnings...),
	}
	switch ft.CreatorOS {
	case 0x5769326B:
		in.CreatorOS = "Wi2k"
	case 0x4D616320:
		in.CreatorOS = "Mac"
	default:
		in.CreatorOS = fmt.Sprintf("%#x", ft.CreatorOS)
	}
	switch ft.Type {
	case typeFixed:
		in.Subformat = "fixed"
		return in
	case typeDynamic:
		in.Subformat = "dynamic"
	case typeDiff:
		in.Subformat = "differencing"
		in.BackingFile, in.BackingFormat = img.parentName, img.parentFormat
		in.ParentUUID = fmtUUID(img.hdr.ParentUUID)
		in.ParentTimestamp = vhdEpoch.Add(time.Duration(img.hdr.ParentTime) * time.Second)
		in.ParentLocators = append([]Locator(nil), img.locators...)
	}
	in.BlockSize = img.blockSize
	in.Batmap = img.batmap.valid
	img.mu.RLock()
	in.BATEntries = len(img.bat)
	for _, e := range img.bat {
		if e != batUnused {
			in.AllocatedBlocks++
		}
	}
	img.mu.RUnlock()
	return in
}
