package ram

import (
	"errors"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/internal/corpus"
)

// FuzzParseHeader feeds arbitrary header pages (and file sizes) to the
// parser: it must never panic, must classify every refusal, and what it
// accepts must re-encode to the same fields.
func FuzzParseHeader(f *testing.F) {
	for _, b := range corpus.Files(f, "ram-*.hdr") {
		f.Add(b, int64(HeaderSize+65536))
	}
	f.Add(header{size: 1 << 20}.encode(), int64(HeaderSize+1<<20))
	f.Fuzz(func(t *testing.T, b []byte, fileSize int64) {
		h, err := parseHeader(b, fileSize)
		if err != nil {
			var fe *image.FormatError
			if !errors.As(err, &fe) {
				t.Fatalf("unclassified error %v", err)
			}
			return
		}
		if h.size < 0 || h.size > MaxSize || HeaderSize+h.size != fileSize {
			t.Fatalf("accepted size %d for file size %d", h.size, fileSize)
		}
		if h2, err := parseHeader(h.encode(), fileSize); err != nil || h2 != h {
			t.Fatalf("round trip: %+v %v", h2, err)
		}
	})
}

// FuzzParseParams: params come from xenstore and YAML.
func FuzzParseParams(f *testing.F) {
	for _, s := range []string{"ram:disk?size=1G", "d", "d?size=64KiB", "../x?size=1", "d?size=1G&x=1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		name, size, err := ParseParams(s)
		if err != nil {
			if !errors.Is(err, ErrBadParams) {
				t.Fatalf("unclassified %v", err)
			}
			return
		}
		if ValidateName(name) != nil || size < 0 || size > MaxSize {
			t.Fatalf("accepted %q -> %q %d", s, name, size)
		}
	})
}
