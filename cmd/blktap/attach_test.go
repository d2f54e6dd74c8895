package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/formats"
)

// Issue 16 item 4: a bare path is probed. Raw bytes are served raw; an
// image of any other format is refused unless its format is named, so
// `attach 0 F.qcow2 xvdk w` can no longer serve the qcow2 container as a
// raw disk whose first write destroys it.
func TestAttachImageBarePath(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	mk := func(format, name string) {
		t.Helper()
		if format == "raw" {
			if err := os.WriteFile(name, make([]byte, 1<<20), 0o600); err != nil {
				t.Fatal(err)
			}
			return
		}
		// qemu-img's images where it is installed: the probe must know
		// what the reference tool writes, not only our own writer.
		if _, err := exec.LookPath("qemu-img"); err == nil {
			qf := map[string]string{"vhd": "vpc"}[format]
			if qf == "" {
				qf = format
			}
			if out, err := exec.Command("qemu-img", "create", "-q", "-f", qf, name, "1M").CombinedOutput(); err != nil {
				t.Fatalf("qemu-img: %v\n%s", err, out)
			}
			return
		}
		if err := formats.Create(format, name, formats.CreateOptions{Size: 1 << 20}); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{"qcow2", "qcow", "vhd", "vmdk"} {
		name := "F." + f
		mk(f, name)
		_, _, err := imageArg(name)
		want := name + " is " + f + ": write " + f + ":" + name + ", or raw:" + name + " to serve its bytes"
		if err == nil || err.Error() != want {
			t.Errorf("bare %s: %v; want %q", name, err, want)
		}
		// The absolute spelling is probed the same way.
		abs := filepath.Join(dir, name)
		if _, _, err := imageArg(abs); err == nil || !strings.Contains(err.Error(), abs+" is "+f) {
			t.Errorf("bare %s: %v", abs, err)
		}
		// Named, it is served as named, either way.
		for _, explicit := range []string{f, "raw"} {
			format, path, err := imageArg(explicit + ":" + name)
			if err != nil || format != explicit || path != abs {
				t.Errorf("%s:%s = %s %s %v", explicit, name, format, path, err)
			}
		}
	}
	mk("raw", "disk.img")
	if format, path, err := imageArg("disk.img"); err != nil || format != "raw" || path != filepath.Join(dir, "disk.img") {
		t.Errorf("bare raw: %s %s %v", format, path, err)
	}
	if format, _, err := imageArg("aio:disk.img"); err != nil || format != "raw" {
		t.Errorf("aio: %s %v", format, err)
	}
	if format, path, err := imageArg("ram:scratch?size=1M"); err != nil || format != "ram" || path != "scratch?size=1M" {
		t.Errorf("ram: %s %s %v", format, path, err)
	}
	var ue *usageError
	if _, _, err := imageArg("qcwo2:disk.img"); !errors.As(err, &ue) || !strings.Contains(err.Error(), "qcwo2") {
		t.Errorf("misspelt format: %v", err)
	}
	if _, _, err := imageArg("missing.qcow2"); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}
