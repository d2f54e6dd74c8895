package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/oracle"
)

// TestEndToEndWorkerBinary: a daemon built with its worker (scripts/build.sh)
// runs every disk's worker from blktap-worker; the same blktap copied
// alone, or beside a worker of another build, runs them as `blktap
// __worker`. Either way the disk serves, and the log says which and why.
func TestEndToEndWorkerBinary(t *testing.T) {
	nbdinfo := oracle.Require(t, "nbdinfo")
	bin := buildBinary(t)
	alone := filepath.Join(t.TempDir(), "blktap")
	stale := filepath.Join(t.TempDir(), "blktap")
	for _, p := range []string{alone, stale} {
		copyExecutable(t, bin, p)
	}
	copyExecutable(t, "/bin/true", filepath.Join(filepath.Dir(stale), "blktap-worker"))

	for _, c := range []struct{ name, bin, exe, log string }{
		{"pair", bin, filepath.Join(filepath.Dir(bin), "blktap-worker"), "workers run from blktap-worker"},
		{"alone", alone, alone, "no blktap-worker beside"},
		{"stale", stale, stale, "is not the worker this blktap was built with"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			cfg := filepath.Join(dir, "disks.yaml")
			yaml := fmt.Sprintf("disks:\n  - {name: d, image: %s/d.raw, format: raw, mode: w, domain: 0, device: xvdb, create: {size: 64M}}\n", dir)
			if err := os.WriteFile(cfg, []byte(yaml), 0o644); err != nil {
				t.Fatal(err)
			}
			d := startDaemon(t, c.bin, cfg)
			row := d.waitConnected("d")["d"]
			exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", row.WorkerPid))
			if err != nil {
				t.Fatal(err)
			}
			if exe != c.exe {
				t.Errorf("worker %d runs %s, want %s", row.WorkerPid, exe, c.exe)
			}
			out := runTool(t, nbdinfo, "--size", row.Export)
			if strings.TrimSpace(out) != "67108864" {
				t.Errorf("nbdinfo --size: %q", out)
			}
			waitLog(t, d.logPath, c.log, 5*time.Second)
		})
	}
}

func copyExecutable(t *testing.T, from, to string) {
	t.Helper()
	if out, err := exec.Command("cp", from, to).CombinedOutput(); err != nil {
		t.Fatalf("cp %s %s: %v\n%s", from, to, err, out)
	}
}

func waitLog(t *testing.T, path, want string, limit time.Duration) {
	t.Helper()
	for deadline := time.Now().Add(limit); ; {
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon log lacks %q:\n%s", want, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
