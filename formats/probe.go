package formats

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// Where each format's magic lives. Offsets count from the start of the file
// unless noted:
//
//	+0    "QFI\xfb" u32 BE version   1 -> qcow, 2 or 3 -> qcow2
//	+0    "KDMV" (sparse extent) or "COWD" (ESX sparse) -> vmdk
//	+0    "# Disk DescriptorFile" (text descriptor)   -> vmdk
//	+0    "conectix" (dynamic VHD: footer copy)       -> vhd
//	EOF-512 "conectix" (every VHD: the footer)        -> vhd
//	anything else                                     -> raw
//
// Formats we recognise but do not serve (qed, vhdx, vdi, luks) are errors,
// not raw: serving their containers as raw disks would hand a guest
// metadata instead of its data.
const (
	probeHead = 1024
	vhdFooter = 512
)

// Probe guesses the format of the image at path from its magic bytes,
// trying raw last. See the package documentation before trusting it.
func Probe(path string) (string, error) {
	if strings.HasPrefix(path, "rbd:") {
		// qemu's protocol prefix: a name in a Ceph pool, not a file.
		return "rbd", nil
	}
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("probe: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("probe %s: %w", path, err)
	}
	if st.IsDir() {
		return "", fmt.Errorf("probe %s: %w: a directory", path, ErrWrongFormat)
	}
	size := st.Size()
	if !st.Mode().IsRegular() {
		// A block device: its size comes from seeking to its end.
		if size, err = f.Seek(0, io.SeekEnd); err != nil {
			return "", fmt.Errorf("probe %s: %w", path, err)
		}
	}
	name, err := probe(f, size)
	if err != nil {
		return "", fmt.Errorf("probe %s: %w", path, err)
	}
	return name, nil
}

// probe reads at most probeHead bytes from the start and vhdFooter bytes
// from the end of an image of the given size.
func probe(r io.ReaderAt, size int64) (string, error) {
	head := make([]byte, min(size, probeHead))
	if err := hostfile.ReadFull(r, head, 0); err != nil {
		return "", err
	}
	var tail []byte
	if size >= vhdFooter {
		tail = make([]byte, vhdFooter)
		if err := hostfile.ReadFull(r, tail, size-vhdFooter); err != nil {
			return "", err
		}
	}
	return probeBytes(head, tail)
}

// probeBytes decides from the first bytes of a file (up to probeHead) and
// its last vhdFooter bytes (nil if the file is shorter).
func probeBytes(head, tail []byte) (string, error) {
	has := func(off int, magic string) bool {
		return len(head) >= off+len(magic) && string(head[off:off+len(magic)]) == magic
	}
	switch {
	case has(0, "QFI\xfb"):
		if len(head) < 8 {
			return "", fmt.Errorf("%w: qcow magic but no version (file of %d bytes)", ErrCorrupt, len(head))
		}
		switch v := binary.BigEndian.Uint32(head[4:8]); v {
		case 1:
			return "qcow", nil
		case 2, 3:
			return "qcow2", nil
		default:
			return "", fmt.Errorf("%w: qcow magic with version %d (known: 1, 2, 3)", ErrUnsupported, v)
		}
	case has(0, "KDMV"), has(0, "COWD"):
		return "vmdk", nil
	case bytes.HasPrefix(bytes.TrimLeft(head, " \t\r\n"), []byte("# Disk DescriptorFile")):
		return "vmdk", nil
	case has(0, "conectix"):
		return "vhd", nil
	case len(tail) == vhdFooter && string(tail[:8]) == "conectix":
		return "vhd", nil
	case has(0, "QED\x00"):
		return "", fmt.Errorf("%w: a QED image", ErrUnsupported)
	case has(0, "vhdxfile"):
		return "", fmt.Errorf("%w: a VHDX image", ErrUnsupported)
	case has(0, "LUKS\xba\xbe"):
		return "", fmt.Errorf("%w: a LUKS volume", ErrUnsupported)
	case len(head) >= 0x44 && binary.LittleEndian.Uint32(head[0x40:0x44]) == 0xbeda107f:
		return "", fmt.Errorf("%w: a VDI image", ErrUnsupported)
	}
	return "raw", nil
}
