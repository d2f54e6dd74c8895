package main

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
)

// qemu-img amend and image amend on copies of the same qcow2 images: both
// succeed or both fail, and after success qemu-img info shows the same
// compat, lazy refcounts and size, qemu-img check is clean and qemu-img
// compare finds the guest's bytes equal. The images hold data, zero
// clusters (plain and preallocated) over a backing file, so a downgrade
// must turn them into zeros version 2 can read.
func TestQemuImgAmendOracle(t *testing.T) {
	bin, qimg, qio, dir := withBase(t, "4M")
	images := []struct{ name, opts, setup string }{
		{"zeros", "cluster_size=4096", "zeros"},
		{"lazy-dirty", "lazy_refcounts=on", "dirty"},
		{"v2", "compat=0.10", ""},
		{"rc8", "refcount_bits=8", ""},
		{"zstd", "compression_type=zstd", "compressed"},
		{"zstd-empty", "compression_type=zstd", ""},
	}
	amends := []string{"compat=0.10", "compat=1.1", "compat=v3,lazy_refcounts=on", "lazy_refcounts=off",
		"lazy_refcounts=on", "compat=0.10,lazy_refcounts=off", "compat=0.10,lazy_refcounts=on", "size=6M", "compat=0.9"}
	for _, im := range images {
		for _, a := range amends {
			t.Run(im.name+"/"+a, func(t *testing.T) {
				sub := t.TempDir()
				for _, who := range []string{"qemu", "ours"} {
					f := filepath.Join(sub, who+".qcow2")
					mustRun(t, sub, qimg, "create", "-q", "-f", "qcow2", "-o", im.opts, "-b", filepath.Join(dir, "base.raw"), "-F", "raw", f, "4M")
					amendSetup(t, sub, qio, im.setup, f)
				}
				_, qe, qrc := runIn(t, sub, qimg, "amend", "-f", "qcow2", "-o", a, "qemu.qcow2")
				_, oe, orc := runIn(t, sub, bin, "image", "amend", "-f", "qcow2", "-o", a, "ours.qcow2")
				if (qrc == 0) != (orc == 0) {
					t.Fatalf("qemu-img: exit %d %q\nours: exit %d %q", qrc, qe, orc, oe)
				}
				if qrc != 0 {
					return
				}
				if q, o := amendedInfo(t, sub, qimg, "qemu.qcow2"), amendedInfo(t, sub, qimg, "ours.qcow2"); q != o {
					t.Fatalf("qemu-img info after qemu-img amend: %s\nafter ours: %s", q, o)
				}
				mustRun(t, sub, qimg, "check", "ours.qcow2")
				mustRun(t, sub, bin, "image", "check", "qemu.qcow2") // ours reads qemu's result
				mustRun(t, sub, qimg, "compare", "qemu.qcow2", "ours.qcow2")
			})
		}
	}
}

// amendSetup writes what an amend case needs into f.
func amendSetup(t *testing.T, dir, qio, setup, f string) {
	t.Helper()
	switch setup {
	case "zeros":
		mustRun(t, dir, qio, "-c", "write -P 0x11 0 64k", "-c", "write -z 64k 64k", "-c", "write -P 0x22 1M 8k",
			"-c", "write -z 1M 4k", "-c", "write -z -u 3M 64k", f)
	case "dirty":
		// An abort leaves a lazy-refcounts image dirty, refcounts behind.
		if _, se, rc := runIn(t, dir, qio, "-c", "write -P 9 0 64k", "-c", "abort", f); rc == 0 {
			t.Fatalf("qemu-io abort exited 0: %s", se)
		}
	case "compressed":
		mustRun(t, dir, qio, "-c", "write -c -P 0x33 0 64k", f)
	}
}

// amendedInfo is what amend may change, as qemu-img info reads it.
func amendedInfo(t *testing.T, dir, qimg, name string) string {
	t.Helper()
	so, se, rc := runIn(t, dir, qimg, "info", "--output=json", name)
	if rc != 0 {
		t.Fatalf("qemu-img info %s: %s", name, se)
	}
	var info struct {
		VirtualSize    int64 `json:"virtual-size"`
		Dirty          bool  `json:"dirty-flag"`
		FormatSpecific struct {
			Data map[string]any `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal([]byte(so), &info); err != nil {
		t.Fatal(err)
	}
	d := info.FormatSpecific.Data
	b, _ := json.Marshal([]any{info.VirtualSize, info.Dirty, d["compat"], d["lazy-refcounts"], d["refcount-bits"], d["compression-type"]})
	return strings.TrimSpace(string(b))
}
