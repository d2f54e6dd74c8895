package ram

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
)

// The backing file starts with one header page; the disk's byte n is the
// file's byte HeaderSize+n, so disk pages line up with tmpfs pages and a
// discard of whole disk pages frees whole memory pages.
//
//	 0        8        12       16                24          4096
//	+--------+--------+--------+-----------------+- ... zero -+------ data ...
//	| magic  | version| hdrsize| virtual size    |            | disk byte 0
//	+--------+--------+--------+-----------------+- ... ------+------ ...
//
// Integers are little-endian. The file never leaves the host that made it
// (it lives on tmpfs), so the byte order is a choice, not a wire fact.
const (
	// HeaderSize is the size of the header page in bytes.
	HeaderSize = 4096
	// MaxSize is the largest virtual size accepted (1 EiB): far above
	// any real disk, far below where offset arithmetic could overflow.
	MaxSize = 1 << 60
	version = 1
)

var magic = [8]byte{'B', 'L', 'K', 'T', 'R', 'A', 'M', 0}

// header is the decoded header page.
type header struct {
	size int64 // virtual size in bytes
}

func (h header) encode() []byte {
	b := make([]byte, HeaderSize)
	copy(b[0:8], magic[:])
	binary.LittleEndian.PutUint32(b[8:12], version)
	binary.LittleEndian.PutUint32(b[12:16], HeaderSize)
	binary.LittleEndian.PutUint64(b[16:24], uint64(h.size))
	return b
}

func formatErr(off int64, field string, class error, detail string, args ...any) error {
	return &image.FormatError{Format: "ram", Offset: off, Field: field, Err: class,
		Detail: fmt.Sprintf(detail, args...)}
}

// parseHeader decodes a header page read from a file of fileSize bytes.
// The bytes come from a file any local user might have planted, so every
// field is checked before use.
func parseHeader(b []byte, fileSize int64) (header, error) {
	if len(b) < 24 {
		return header{}, formatErr(0, "header", image.ErrWrongFormat,
			"file is %d bytes, shorter than a header", len(b))
	}
	if !bytes.Equal(b[0:8], magic[:]) {
		return header{}, formatErr(0, "magic", image.ErrWrongFormat, "not a blktap RAM disk (magic %q)", b[0:8])
	}
	if v := binary.LittleEndian.Uint32(b[8:12]); v != version {
		return header{}, formatErr(8, "version", image.ErrUnsupported, "version %d (this build knows %d)", v, version)
	}
	if hs := binary.LittleEndian.Uint32(b[12:16]); hs != HeaderSize {
		return header{}, formatErr(12, "header_size", image.ErrCorrupt, "%d, want %d", hs, HeaderSize)
	}
	size := binary.LittleEndian.Uint64(b[16:24])
	if size > MaxSize {
		return header{}, formatErr(16, "size", image.ErrCorrupt, "%d is more than the maximum %d", size, int64(MaxSize))
	}
	if want := HeaderSize + int64(size); fileSize != want {
		return header{}, formatErr(16, "size", image.ErrCorrupt,
			"header says %d bytes of disk, so the file should be %d bytes, but it is %d", size, want, fileSize)
	}
	return header{size: int64(size)}, nil
}
