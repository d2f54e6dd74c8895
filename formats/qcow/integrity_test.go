package qcow

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
	"github.com/blktap-go/blktap/internal/oracle"
)

// damagedQcow makes a 4 MiB qcow image with qemu (4 KiB clusters: L1 at
// 0x30, L2 at 0x1000, guest cluster 0 at 0x2000, guest cluster 2 at
// 0x3000) whose entry for guest cluster 0 names the L2 table itself.
func damagedQcow(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "d.qcow")
	run(t, oracle.Require(t, "qemu-img"), "create", "-q", "-f", "qcow", p, "4M")
	run(t, oracle.Require(t, "qemu-io"), "-f", "qcow", "-c", "write -P 0xaa 0 4k", "-c", "write -P 0xbb 8k 4k", p)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	be := binary.BigEndian
	if be.Uint64(b[0x30:]) != 0x1000 || be.Uint64(b[0x1000:]) != 0x2000 || be.Uint64(b[0x1010:]) != 0x3000 {
		t.Fatal("qemu laid the image out differently")
	}
	be.PutUint64(b[0x1000:], 0x1000)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func wantCorrupt(t *testing.T, what string, err error) {
	t.Helper()
	if !errors.Is(err, image.ErrCorrupt) || !strings.Contains(err.Error(), "metadata") {
		t.Fatalf("%s: got %v, want a refusal to write on metadata", what, err)
	}
}

// TestWriteOnMetadataRefused: a write through an L2 entry that names an
// L2 table, and a discard that would punch that table out, are refused;
// so is every write after them; what was acknowledged before stays, and
// nothing else in the file changes.
func TestWriteOnMetadataRefused(t *testing.T) {
	for _, op := range []string{"write", "discard"} {
		t.Run(op, func(t *testing.T) {
			p := damagedQcow(t)
			before, err := Check(p, CheckOptions{})
			if err != nil {
				t.Fatal(err)
			}
			orig, _ := os.ReadFile(p)
			img, err := Open(p, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := img.WriteAt(bytes.Repeat([]byte{0x11}, 512), 8192); err != nil {
				t.Fatalf("write to a sound cluster: %v", err)
			}
			if op == "write" {
				_, err = img.WriteAt(bytes.Repeat([]byte{0xcc}, 4096), 0)
			} else {
				err = img.Discard(0, 4096)
			}
			wantCorrupt(t, op, err)
			_, err = img.WriteAt([]byte{1}, 8192)
			wantCorrupt(t, "write after the refusal", err)
			if err := img.Flush(); err != nil {
				t.Fatal(err)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			now := imagetest.ChangedOnly(t, p, orig, [2]int{0x3000, 0x3200})
			if !bytes.Equal(now[0x3000:0x3200], bytes.Repeat([]byte{0x11}, 512)) {
				t.Fatal("the acknowledged write is not in the file")
			}
			after, err := Check(p, CheckOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if after.CorruptionCount != before.CorruptionCount {
				t.Fatalf("check: %d corruptions, %d before", after.CorruptionCount, before.CorruptionCount)
			}
		})
	}
}

// TestL2OverBackingNameRefused: an L2 table placed over the backing file
// name is refused on open.
func TestL2OverBackingNameRefused(t *testing.T) {
	b := make([]byte, 0x3000)
	be := binary.BigEndian
	copy(b, "QFI\xfb")
	be.PutUint32(b[4:], 1)
	be.PutUint64(b[8:], 0x1000) // backing name at 0x1000
	be.PutUint32(b[16:], 4)
	be.PutUint64(b[24:], 1<<20)
	b[32], b[33] = 12, 9
	be.PutUint64(b[40:], 0x30)
	be.PutUint64(b[0x30:], 0x1000) // L2 table over the name
	copy(b[0x1000:], "base")
	_, err := openStorage(newMemFile(b), "x", Options{Backing: func(string, string) (image.Image, error) {
		t.Fatal("backing opened")
		return nil, nil
	}})
	if !errors.Is(err, image.ErrCorrupt) || !strings.Contains(err.Error(), "backing file name") {
		t.Fatalf("got %v", err)
	}
}
