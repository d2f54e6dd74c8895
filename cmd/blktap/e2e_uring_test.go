package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/formats/raw"
	"github.com/blktap-go/blktap/internal/oracle"
)

// io: uring from the YAML reaches the worker: a dom0 disk and a guest
// disk with it serve what qemu-io writes and reads through their exports
// (the guest's through the ring), and their workers hold an io_uring
// afterwards while a threads disk's worker holds none.
func TestEndToEndURing(t *testing.T) {
	oracle.RequireURing(t, raw.URingSupported())
	qemuIO := oracle.Require(t, "qemu-io")
	bin := buildBinary(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "disks.yaml")
	yaml := fmt.Sprintf(`disks:
  - {name: u0, image: %[1]s/u0.raw, format: raw, device: xvdb, create: {size: 16M}, io: uring}
  - {name: u1, image: %[1]s/u1.raw, format: raw, domain: 1, device: xvdb, create: {size: 16M}, io: uring}
  - {name: t0, image: %[1]s/t0.raw, format: raw, device: xvdc, create: {size: 16M}, io: threads}
`, dir)
	if err := os.WriteFile(cfg, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, bin, cfg)
	rows := d.waitConnected("u0", "u1", "t0")
	for _, name := range []string{"u0", "u1", "t0"} {
		runTool(t, qemuIO, "-f", "raw", rows[name].Export,
			"-c", "write -P 0x5a 0 64k", "-c", "write -P 0xa5 1M 1M", "-c", "flush",
			"-c", "read -P 0x5a 0 64k", "-c", "read -P 0xa5 1M 1M", "-c", "read -P 0 2M 1M")
		got := hasURing(t, rows[name].WorkerPid)
		if want := name != "t0"; got != want {
			t.Errorf("%s: worker %d holds an io_uring: %v, want %v", name, rows[name].WorkerPid, got, want)
		}
	}
}

// hasURing reports whether process pid has an io_uring instance open.
func hasURing(t *testing.T, pid int) bool {
	t.Helper()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds {
		link, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if err == nil && strings.Contains(link, "io_uring") {
			return true
		}
	}
	return false
}
