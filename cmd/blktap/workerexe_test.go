package main

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// findWorker takes the worker beside blktap or in ../libexec/blktap, and
// only the one whose SHA-256 blktap was built with.
func TestFindWorker(t *testing.T) {
	body := []byte("#!/bin/sh\n# a worker\n")
	h := sha256.Sum256(body)
	sum := hex.EncodeToString(h[:])
	write := func(p string, b []byte) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	build := t.TempDir() // a build tree: bin/blktap, bin/blktap-worker
	write(filepath.Join(build, "bin/blktap"), nil)
	write(filepath.Join(build, "bin/blktap-worker"), body)
	inst := t.TempDir() // an install: sbin/blktap, libexec/blktap/blktap-worker
	write(filepath.Join(inst, "sbin/blktap"), nil)
	write(filepath.Join(inst, "libexec/blktap/blktap-worker"), body)
	stale := t.TempDir() // a worker of another build
	write(filepath.Join(stale, "blktap"), nil)
	write(filepath.Join(stale, "blktap-worker"), append(body, '\n'))
	alone := t.TempDir()
	write(filepath.Join(alone, "blktap"), nil)

	for _, c := range []struct {
		name, self, sum, want, why string
	}{
		{"build tree", filepath.Join(build, "bin/blktap"), sum, filepath.Join(build, "bin/blktap-worker"), ""},
		{"installed", filepath.Join(inst, "sbin/blktap"), sum, filepath.Join(inst, "libexec/blktap/blktap-worker"), ""},
		{"another build's worker", filepath.Join(stale, "blktap"), sum, "", "is not the worker this blktap was built with"},
		{"no worker", filepath.Join(alone, "blktap"), sum, "", "no blktap-worker beside"},
		{"built without the sum", filepath.Join(build, "bin/blktap"), "", "", "without its worker's sum"},
	} {
		got, why := findWorker(c.self, c.sum)
		if got != c.want || !strings.Contains(why, c.why) || (c.want == "") != (why != "") {
			t.Errorf("%s: %q (%q), want %q (%q)", c.name, got, why, c.want, c.why)
		}
	}
}
