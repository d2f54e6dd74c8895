package vhd

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
)

// TestOverlappingMetadataNotWritten: a disk whose BAT lies over its
// dynamic header, or whose parent locator lies over its BAT, is refused
// read-write before any byte of it changes.
func TestOverlappingMetadataNotWritten(t *testing.T) {
	for _, name := range []string{"vhd-bat-over-header.vhd", "vhd-locator-over-bat.vhd"} {
		t.Run(name, func(t *testing.T) {
			orig, err := os.ReadFile(filepath.Join("testdata", name))
			if err != nil {
				t.Fatal(err)
			}
			p := filepath.Join(t.TempDir(), name)
			if err := os.WriteFile(p, orig, 0o644); err != nil {
				t.Fatal(err)
			}
			img, err := Open(p, Options{Logger: discardLogger(), Backing: fileOpener(filepath.Dir(p))})
			if err == nil {
				img.WriteAt(make([]byte, 4096), 0)
				img.Close()
				t.Fatal("opened read-write")
			}
			if !errors.Is(err, image.ErrCorrupt) {
				t.Fatalf("got %v, want a corruption", err)
			}
			t.Log(err)
			if now, _ := os.ReadFile(p); !bytes.Equal(now, orig) {
				t.Fatal("the file changed")
			}
		})
	}
}
