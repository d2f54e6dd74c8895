package hostfile

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestOSFSConfinedOpen(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "img")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(root, "secret")
	os.WriteFile(secret, []byte("x"), 0o644)
	os.WriteFile(filepath.Join(dir, "ext"), []byte("y"), 0o644)
	if err := os.Symlink(secret, filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	var fs OSFS
	for _, name := range []string{"../secret", secret, "link"} {
		if f, err := fs.OpenIn(dir, name, os.O_RDONLY, 0, true); !errors.Is(err, ErrEscape) {
			if f != nil {
				f.Close()
			}
			t.Errorf("confined open of %q: %v, want ErrEscape", name, err)
		}
	}
	for _, name := range []string{"ext", "link", secret} {
		f, err := fs.OpenIn(dir, name, os.O_RDONLY, 0, name == "ext")
		if err != nil {
			t.Fatalf("open of %q: %v", name, err)
		}
		f.Close()
	}
	if err := fs.SyncDir(dir); err != nil {
		t.Fatal(err)
	}
	if err := fs.Remove(filepath.Join(dir, "ext")); err != nil {
		t.Fatal(err)
	}
}
