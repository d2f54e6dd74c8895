package qcow2

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// A power cut at the operations of an amend leaves a valid image of the
// old settings or the new, showing the guest the same bytes either way:
// a downgrade's zero clusters (over a backing file that would show
// through) become zeros before the header says version 2; a dirty lazy
// image's refcounts are exact before the bit goes.
func TestAmendCrash(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "base.raw"), bytes.Repeat([]byte{0xEE}, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	off := false
	configs := []struct {
		name   string
		o      CreateOptions
		amend  AmendOptions
		compat []string // what qemu-img info may report after the cut
	}{
		{"downgrade", CreateOptions{Size: 1 << 20, ClusterSize: 4096, Backing: "base.raw", BackingFormat: "raw"}, AmendOptions{Compat: "0.10"}, []string{"1.1", "0.10"}},
		{"upgrade", CreateOptions{Size: 1 << 20, ClusterSize: 4096, Compat: "0.10"}, AmendOptions{Compat: "1.1"}, []string{"0.10", "1.1"}},
		{"lazy-off-dirty", CreateOptions{Size: 1 << 20, ClusterSize: 4096, LazyRefcounts: true}, AmendOptions{LazyRefcounts: &off}, []string{"1.1"}},
	}
	for _, c := range configs {
		t.Run(c.name, func(t *testing.T) {
			tmpl := amendTemplate(t, dir, c.name, c.o)
			ref := filepath.Join(dir, c.name+".ref.qcow2")
			if err := os.WriteFile(ref, tmpl, 0o644); err != nil {
				t.Fatal(err)
			}
			want := qemuRaw(t, ref)
			op := func(img *Image) error { return img.Amend(c.amend) }
			for _, n := range cutPoints(t, dir, tmpl, op, len(configs)) {
				p := cutAt(t, dir, tmpl, op, n)
				checkCut(t, p, n, c.o.LazyRefcounts)
				var info struct {
					Specific struct {
						Data struct {
							Compat string `json:"compat"`
						} `json:"data"`
					} `json:"format-specific"`
				}
				if err := json.Unmarshal([]byte(run(t, "qemu-img", "info", "--output=json", p)), &info); err != nil {
					t.Fatal(err)
				}
				if got := info.Specific.Data.Compat; got != c.compat[0] && got != c.compat[len(c.compat)-1] {
					t.Fatalf("op %d: compat %q, want one of %q", n, got, c.compat)
				}
				sameBytes(t, fmt.Sprintf("op %d", n), qemuRaw(t, p), want)
				os.Remove(p)
			}
		})
	}
}

// amendTemplate: data, zero clusters over the backing file (version 3),
// and for a lazy image no clean close, so it is dirty.
func amendTemplate(t *testing.T, dir, name string, o CreateOptions) []byte {
	tmpl := filepath.Join(dir, name+".tmpl")
	if err := Create(tmpl, o); err != nil {
		t.Fatal(err)
	}
	mf, img := openOnCrashFS(t, tmpl, readFile(t, tmpl))
	if _, err := img.WriteAt(sectorPattern(512<<10), 0); err != nil {
		t.Fatal(err)
	}
	for _, r := range [][2]int64{{64 << 10, 64 << 10}, {600 << 10, 128 << 10}, {900 << 10, 8 << 10}} {
		if err := img.Discard(r[0], r[1]); err != nil {
			t.Fatal(err)
		}
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	if !o.LazyRefcounts {
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
	}
	return mf.Bytes()
}
