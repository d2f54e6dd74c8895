package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// `blktap run` without -c reads the default file when it exists.
func TestConfigPathDefault(t *testing.T) {
	dir := t.TempDir()
	def := filepath.Join(dir, "disks.yaml")
	if got := configPath(false, "", def); got != "" {
		t.Errorf("no file: %q, want none", got)
	}
	os.WriteFile(def, []byte("disks: []\n"), 0o644)
	if got := configPath(false, "", def); got != def {
		t.Errorf("file exists: %q, want %q", got, def)
	}
	if got := configPath(true, "/x.yaml", def); got != "/x.yaml" {
		t.Errorf("-c given: %q", got)
	}
	if got := configPath(true, "", def); got != "" {
		t.Errorf("-c '': %q, want none", got)
	}
}

// make's -X overrides what the build information says.
func TestVersionString(t *testing.T) {
	version, commit = "1.2.3", "abc123"
	defer func() { version, commit = "", "" }()
	s := versionString()
	if !strings.HasPrefix(s, "blktap 1.2.3 (github.com/blktap-go/blktap, commit abc123") {
		t.Errorf("%q", s)
	}
}
