package oracle

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// VHDIMount mounts the VHD at path with libvhdi's FUSE tool, which
// follows a differencing disk's chain itself, and returns what the top
// layer (the highest vhdiN) reads. Tests of VHD chains use it because
// qemu-img reads a differencing VHD as a standalone disk.
func VHDIMount(t testing.TB, path string) []byte {
	t.Helper()
	vm := Require(t, "vhdimount")
	mnt := t.TempDir()
	if out, err := exec.Command(vm, path, mnt).CombinedOutput(); err != nil {
		t.Fatalf("vhdimount %s: %v\n%s", path, err, out)
	}
	defer func() {
		if err := exec.Command("fusermount", "-u", mnt).Run(); err != nil {
			exec.Command("umount", mnt).Run()
		}
	}()
	ents, err := os.ReadDir(mnt)
	if err != nil || len(ents) == 0 {
		t.Fatalf("vhdimount shows nothing: %v", err)
	}
	top := ""
	for _, e := range ents {
		if len(e.Name()) > len(top) || e.Name() > top {
			top = e.Name()
		}
	}
	b, err := os.ReadFile(filepath.Join(mnt, top))
	if err != nil {
		t.Fatal(err)
	}
	return b
}
