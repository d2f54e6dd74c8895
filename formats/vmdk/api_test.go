package vmdk

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
)

// TestExtentConfinement: a descriptor may not reach outside its directory,
// by absolute name, "..", or a symlink, unless the caller allows it.
func TestExtentConfinement(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "img")
	secret := filepath.Join(root, "secret")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(secret, []byte(strings.Repeat("s", 4096)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(secret, filepath.Join(dir, "link-flat.vmdk")); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{secret, "../secret", "link-flat.vmdk"} {
		p := filepath.Join(dir, "d.vmdk")
		os.Remove(p)
		if err := os.WriteFile(p, []byte(strings.Replace(flatDesc, "good-flat-flat.vmdk", name, 1)), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := Open(p, Options{ReadOnly: true}); !errors.Is(err, image.ErrUnsupported) {
			t.Errorf("extent %q without AllowUnconfinedExtents: %v, want ErrUnsupported", name, err)
		}
		img, err := Open(p, Options{ReadOnly: true, AllowUnconfinedExtents: true})
		if err != nil {
			t.Fatalf("extent %q with AllowUnconfinedExtents: %v", name, err)
		}
		b := make([]byte, 1)
		if _, err := img.ReadAt(b, 0); err != nil || b[0] != 's' {
			t.Fatalf("read %q: %v %q", name, err, b)
		}
		img.Close()
	}
}

// TestContract: the image.Image duties that are not about data.
func TestContract(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "c.vmdk")
	if err := Create(p, CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	ro, err := Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ro.WriteAt([]byte{1}, 0); !errors.Is(err, image.ErrReadOnly) {
		t.Errorf("write read-only: %v", err)
	}
	if err := ro.Discard(0, 512); !errors.Is(err, image.ErrReadOnly) {
		t.Errorf("discard read-only: %v", err)
	}
	ro.Close()
	img, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.ReadAt(make([]byte, 2), 1<<20-1); !errors.Is(err, image.ErrOutOfRange) {
		t.Errorf("read past end: %v", err)
	}
	if _, err := img.WriteAt(make([]byte, 2), 1<<20-1); !errors.Is(err, image.ErrOutOfRange) {
		t.Errorf("write past end: %v", err)
	}
	if _, err := img.Map(0, 1<<20+1); !errors.Is(err, image.ErrOutOfRange) {
		t.Errorf("map past end: %v", err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := img.ReadAt(make([]byte, 1), 0); !errors.Is(err, image.ErrClosed) {
		t.Errorf("read after close: %v", err)
	}
	if err := img.Close(); !errors.Is(err, image.ErrClosed) {
		t.Errorf("second close: %v", err)
	}
	if err := Create(filepath.Join(dir, "x.vmdk"), CreateOptions{Size: 1 << 20, Subformat: "streamOptimized"}); !errors.Is(err, image.ErrUnsupported) {
		t.Errorf("create streamOptimized: %v", err)
	}
	if err := Create(filepath.Join(dir, "y.vmdk"), CreateOptions{Size: 1 << 20, Backing: "c.vmdk", BackingFormat: "qcow2"}); !errors.Is(err, image.ErrUnsupported) {
		t.Errorf("create over a qcow2 parent: %v", err)
	}
	if !Detect([]byte("KDMV\x01\x00\x00\x00")) || !Detect([]byte("# Disk DescriptorFile\nversion=1\n")) || Detect([]byte("QFI\xfb")) || Detect(make([]byte, 512)) {
		t.Error("Detect")
	}
}

// TestInfoMatchesQemu: Info agrees with qemu-img info on what both report.
func TestInfoMatchesQemu(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "i.vmdk")
	run(t, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", p, "100M")
	var qi struct {
		VirtualSize int64 `json:"virtual-size"`
		ClusterSize int64 `json:"cluster-size"`
		Spec        struct {
			Data struct {
				CID        uint32 `json:"cid"`
				ParentCID  uint32 `json:"parent-cid"`
				CreateType string `json:"create-type"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal([]byte(run(t, "qemu-img", "info", "--output=json", p)), &qi); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	in := img.Info()
	if in.VirtualSize != qi.VirtualSize || in.ClusterSize != qi.ClusterSize || in.CID != qi.Spec.Data.CID ||
		in.ParentCID != qi.Spec.Data.ParentCID || in.CreateType != qi.Spec.Data.CreateType || !in.Extents[0].ZeroedGrain {
		t.Fatalf("ours %+v, qemu %+v", in, qi)
	}
}
