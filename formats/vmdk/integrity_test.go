package vmdk

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/imagetest"
)

// qemuVMDK makes a 4 MiB monolithicSparse image with qemu holding 0xaa in
// grain 0 and 0xbb in grain 2. qemu's layout, in sectors: redundant
// directory 21, redundant table 22, directory 26, table 27, grains from
// 128 (grain 0) and 256 (grain 2).
func qemuVMDK(t *testing.T, breakIt func(b []byte) []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "d.vmdk")
	run(t, "qemu-img", "create", "-q", "-f", "vmdk", p, "4M")
	run(t, "qemu-io", "-f", "vmdk", "-c", "write -P 0xaa 0 64k", "-c", "write -P 0xbb 128k 64k", p)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	le := binary.LittleEndian
	if le.Uint32(b[26*512:]) != 27 || le.Uint32(b[21*512:]) != 22 || le.Uint32(b[27*512:]) != 128 || le.Uint32(b[27*512+8:]) != 256 {
		t.Fatal("qemu laid the image out differently")
	}
	b = breakIt(b)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func corruptions(t *testing.T, p string) int {
	t.Helper()
	r, err := Check(p, CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return r.Corruptions
}

// TestGrainOnMetadataRefused: the grain tables moved to the end of the
// file (sectors 384 and 388, inside the data area, where our writer puts
// new tables) with its entry for grain 0 naming the table itself: a write to
// grain 0 would rewrite the table. The write is refused, a write to a
// sound grain is not, and nothing else in the file changes.
func TestGrainOnMetadataRefused(t *testing.T) {
	p := qemuVMDK(t, func(b []byte) []byte {
		le := binary.LittleEndian
		gt := append([]byte(nil), b[27*512:31*512]...)
		le.PutUint32(gt, 384)
		// Primary copy at 384, redundant at 388; the old tables at 22
		// and 27 become unused space.
		b = append(append(b[:384*512:384*512], gt...), gt...)
		le.PutUint32(b[26*512:], 384)
		le.PutUint32(b[21*512:], 388)
		return b
	})
	before := corruptions(t, p)
	orig, _ := os.ReadFile(p)
	img, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(bytes.Repeat([]byte{0x11}, 4096), 128<<10); err != nil {
		t.Fatalf("write to a sound grain: %v", err)
	}
	_, err = img.WriteAt(bytes.Repeat([]byte{0xcc}, 4096), 0)
	if !errors.Is(err, image.ErrCorrupt) || !strings.Contains(err.Error(), "metadata") {
		t.Fatalf("write through the bad entry: got %v", err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	// The descriptor (sectors 1-20) gets a new CID on the first write.
	now := imagetest.ChangedOnly(t, p, orig, [2]int{256 * 512, 256*512 + 4096}, [2]int{512, 21 * 512})
	if !bytes.Equal(now[256*512:256*512+4096], bytes.Repeat([]byte{0x11}, 4096)) {
		t.Fatal("the acknowledged write is not in the file")
	}
	if after := corruptions(t, p); after != before {
		t.Fatalf("check: %d corruptions, %d before", after, before)
	}
}

// TestOverlappingTablesRefused: a directory entry naming the redundant
// table (so one grain table is stored over another) is refused on a
// read-write open, before anything is written; read-only it opens.
func TestOverlappingTablesRefused(t *testing.T) {
	p := qemuVMDK(t, func(b []byte) []byte { binary.LittleEndian.PutUint32(b[26*512:], 22); return b })
	orig, _ := os.ReadFile(p)
	img, err := Open(p, Options{})
	if err == nil {
		img.Close()
		t.Fatal("opened read-write")
	}
	if !errors.Is(err, image.ErrCorrupt) || !strings.Contains(err.Error(), "overlaps") {
		t.Fatalf("got %v", err)
	}
	if now, _ := os.ReadFile(p); !bytes.Equal(now, orig) {
		t.Fatal("the file changed")
	}
	ro, err := Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatalf("read-only open: %v", err)
	}
	ro.Close()
}
