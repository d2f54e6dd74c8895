package vhd

// Differencing disks: the parent locators, the candidate paths they
// name, and opening the parent.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// Locator is a decoded parent locator (Info and Check show them).
type Locator struct {
	Platform string `json:"platform"` // "W2ru", "W2ku", "MacX", ...
	Name     string `json:"name,omitempty"`
	Offset   uint64 `json:"offset"`
	Length   uint32 `json:"length"`
	Error    string `json:"error,omitempty"`
	inFile   bool
	space    int64
}

func platName(code uint32) string {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], code)
	for _, c := range b {
		if c < 0x20 || c > 0x7e {
			return fmt.Sprintf("%#08x", code)
		}
	}
	return string(b[:])
}

// locatorSpace follows libvhd: data_space is meant in sectors but some
// writers store bytes.
func locatorSpace(l locator) int64 {
	if l.DataSpace < sectorSize {
		return int64(l.DataSpace) * sectorSize
	}
	return roundUp(int64(l.DataSpace), sectorSize)
}

func (img *Image) parseLocators() {
	for _, l := range img.hdr.Locators {
		if l.Code == platNone {
			continue
		}
		loc := Locator{Platform: platName(l.Code), Offset: l.DataOffset, Length: l.DataLength, space: locatorSpace(l)}
		switch {
		case l.Code != platW2ru && l.Code != platW2ku && l.Code != platMacX:
			loc.Error = "platform not supported"
		case l.DataLength == 0 || l.DataLength > 4096:
			loc.Error = fmt.Sprintf("data length %d out of range", l.DataLength)
		case l.DataOffset%sectorSize != 0 || l.DataOffset > uint64(img.fileSize) || uint64(img.fileSize)-l.DataOffset < uint64(l.DataLength):
			loc.Error = fmt.Sprintf("data at %d+%d outside the file", l.DataOffset, l.DataLength)
		case int64(l.DataLength) > loc.space:
			loc.Error = fmt.Sprintf("data length %d exceeds data space %d", l.DataLength, loc.space)
		}
		if loc.Error == "" {
			loc.inFile = true
			b := make([]byte, l.DataLength)
			if err := hostfile.ReadFull(img.f, b, int64(l.DataOffset)); err != nil {
				loc.Error = err.Error()
			} else {
				name, err := decodeLocator(l.Code, b)
				if err != nil {
					loc.Error = err.Error()
				}
				loc.Name = name
			}
		}
		img.locators = append(img.locators, loc)
	}
}

func decodeLocator(code uint32, b []byte) (string, error) {
	switch code {
	case platMacX:
		s := strings.TrimRight(string(b), "\x00")
		if !strings.HasPrefix(s, "file://") {
			return "", fmt.Errorf("MacX locator %q is not a file:// URL", s)
		}
		return s[len("file://"):], nil
	case platW2ru, platW2ku:
		s, err := decodeUTF16(b, false)
		if err != nil {
			return "", err
		}
		s = strings.ReplaceAll(s, `\`, "/")
		if len(s) >= 2 && s[1] == ':' { // a drive letter means nothing here
			s = s[2:]
		}
		if code == platW2ru {
			s = filepath.Clean(s)
		}
		return s, nil
	}
	return "", fmt.Errorf("platform %s not supported", platName(code))
}

// parentCandidatesList orders the parent names: relative first (it
// survives moving the chain), then absolute, then the bare parent name.
func (img *Image) parentCandidatesList() []string {
	var out []string
	seen := map[string]bool{}
	add := func(s string) {
		if s != "" && !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	for _, want := range []string{"W2ru", "W2ku", "MacX"} {
		for _, l := range img.locators {
			if l.Platform == want && l.Error == "" {
				add(l.Name)
			}
		}
	}
	bigEndian := !(img.foot.isTap() && img.foot.CreatorVer == 0x00000001)
	if n, err := decodeUTF16(img.hdr.ParentName[:], bigEndian); err == nil {
		add(n)
	}
	return out
}

// UUID is the disk's unique id from its footer. A differencing child
// records its parent's.
func (img *Image) UUID() [16]byte { return img.foot.UUID }

func (img *Image) openParent(open image.OpenFunc) error {
	img.parentCandidates = img.parentCandidatesList()
	if len(img.parentCandidates) == 0 {
		return fmtErr(image.ErrCorrupt, int64(img.foot.DataOffset)+64, "parent_name", "differencing disk names no parent (no usable locator or parent name)")
	}
	img.parentName, img.parentFormat = img.parentCandidates[0], "vhd"
	if open == nil {
		return fmt.Errorf("vhd: %s is a differencing disk and needs its parent %q, but no backing opener was given: %w", img.path, img.parentName, image.ErrUnsupported)
	}
	var errs []error
	for _, name := range img.parentCandidates {
		p, err := open(name, "vhd")
		if err != nil {
			errs = append(errs, fmt.Errorf("parent %q: %w", name, err))
			continue
		}
		if u, ok := p.(interface{ UUID() [16]byte }); ok {
			if got := u.UUID(); got != img.hdr.ParentUUID {
				p.Close()
				errs = append(errs, fmtErr(image.ErrCorrupt, int64(img.foot.DataOffset)+40, "parent_uuid",
					"parent %q has uuid %s, the child expects %s", name, fmtUUID(got), fmtUUID(img.hdr.ParentUUID)))
				continue
			}
		} else {
			img.warn("parent %q cannot report its uuid; parent uuid not checked", name)
		}
		if pi, ok := p.(*Image); ok {
			// libvhd records the parent file's mtime here; copying the
			// file moves it, so a mismatch is only a warning.
			if st, err := os.Stat(pi.path); err == nil && vhdTime(st.ModTime()) != img.hdr.ParentTime {
				img.warn("parent timestamp %d differs from the parent file's mtime %d", img.hdr.ParentTime, vhdTime(st.ModTime()))
			}
		}
		if p.Size() != img.size {
			img.warn("parent %q is %d bytes, the child %d", name, p.Size(), img.size)
		}
		img.parent, img.parentName = p, name
		return nil
	}
	return fmt.Errorf("vhd: %s: cannot open its parent: %w", img.path, errors.Join(errs...))
}

func (img *Image) closeParent() {
	if img.parent != nil {
		img.parent.Close()
		img.parent = nil
	}
}
