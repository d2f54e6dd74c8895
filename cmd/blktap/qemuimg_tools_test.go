package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/internal/oracle"
)

// TestImageCreateOptions: the -o keys we honour make images qemu-img
// reads back with those settings; keys we do not are refused by name with
// the valid ones listed, and -o help lists them.
func TestImageCreateOptions(t *testing.T) {
	bin := imageBinary(t)
	dir := t.TempDir()
	qi := oracle.Require(t, "qemu-img")
	mustRun(t, dir, bin, "image", "create", "-f", "qcow2", "-o", "size=32M,lazy_refcounts=on,refcount_bits=8,cluster_size=4k", "l.qcow2")
	mustRun(t, dir, bin, "image", "create", "-f", "qcow2", "-o", "compat=0.10,preallocation=off,compression_type=zlib", "v2.qcow2", "16M")
	mustRun(t, dir, bin, "image", "create", "-f", "qcow2", "-o", "backing_file=v2.qcow2,backing_fmt=qcow2", "over.qcow2")
	mustRun(t, dir, bin, "image", "create", "-f", "vpc", "-o", "subformat=fixed,force_size=on", "f.vhd", "8M")
	for _, c := range []struct {
		file, f string
		want    map[string]any // dotted paths into qemu-img info's JSON
	}{
		{"l.qcow2", "", map[string]any{"virtual-size": 32.0 * (1 << 20), "cluster-size": 4096.0,
			"format-specific.data.lazy-refcounts": true, "format-specific.data.refcount-bits": 8.0}},
		{"v2.qcow2", "", map[string]any{"format-specific.data.compat": "0.10"}},
		{"over.qcow2", "", map[string]any{"backing-filename": "v2.qcow2", "backing-filename-format": "qcow2", "virtual-size": 16.0 * (1 << 20)}},
		{"f.vhd", "vpc", map[string]any{"format": "vpc", "virtual-size": 8.0 * (1 << 20)}},
	} {
		args := []string{"info", "--output=json"}
		if c.f != "" {
			args = append(args, "-f", c.f)
		}
		out, se, rc := runIn(t, dir, qi, append(args, c.file)...)
		if rc != 0 {
			t.Fatalf("qemu-img info %s: %s", c.file, se)
		}
		var doc map[string]any
		if err := json.Unmarshal([]byte(out), &doc); err != nil {
			t.Fatal(err)
		}
		for path, want := range c.want {
			var v any = doc
			for _, k := range strings.Split(path, ".") {
				m, _ := v.(map[string]any)
				v = m[k]
			}
			if v != want {
				t.Errorf("%s: %s = %v, want %v", c.file, path, v, want)
			}
		}
	}
	for _, c := range []struct {
		args []string
		msg  string
	}{
		{[]string{"-f", "qcow2", "-o", "preallocation=full", "x.qcow2", "1M"}, "preallocation=full is not supported for qcow2; valid: off"},
		{[]string{"-f", "qcow2", "-o", "data_file=d", "x.qcow2", "1M"}, "data_file is not supported for qcow2; valid: backing_file, backing_fmt, cluster_size, compat,"},
		{[]string{"-f", "vmdk", "-o", "hwversion=6", "x.vmdk", "1M"}, "hwversion is not supported for vmdk; valid: adapter_type,"},
		{[]string{"-f", "raw", "-o", "bogus=1", "x.raw", "1M"}, "bogus is not supported for raw; valid: size"},
	} {
		_, se, rc := runIn(t, dir, bin, append([]string{"image", "create"}, c.args...)...)
		if rc != 2 || !strings.Contains(se, c.msg) {
			t.Errorf("create %v: exit %d, stderr %q; want 2 and %q", c.args, rc, se, c.msg)
		}
		if _, err := os.Stat(filepath.Join(dir, c.args[len(c.args)-2])); err == nil {
			t.Errorf("create %v made the file though it refused", c.args)
		}
	}
	for _, f := range []string{"qcow2", "vpc", "vmdk", "raw", "qcow"} {
		for _, cmd := range [][]string{{"image", "create", "-f", f, "-o", "help"}, {"image", "convert", "-O", f, "-o", "?"}} {
			out, se, rc := runIn(t, dir, bin, cmd...)
			if rc != 0 || !strings.HasPrefix(out, "Supported "+f+" options:\n") || !strings.Contains(out, "  size=<size>") {
				t.Errorf("%v: exit %d (%s):\n%s", cmd, rc, se, out)
			}
		}
	}
}

// TestQemuImgZstdAndDeflate: compressed qcow2 both ways with qemu-img,
// zstd and deflate: what qemu-img writes we read, what we write qemu-img
// checks clean and compares identical, and ours stays near qemu's size.
func TestQemuImgZstdAndDeflate(t *testing.T) {
	bin := imageBinary(t)
	dir := t.TempDir()
	qi := oracle.Require(t, "qemu-img")
	qio := oracle.Require(t, "qemu-io")
	// 8 MiB of text-like runs, random runs and zeros.
	var raw []byte
	for i := 0; len(raw) < 8<<20; i++ {
		switch i % 4 {
		case 0:
			raw = append(raw, strings.Repeat(fmt.Sprintf("line %d of a log, status ok\n", i), 400)...)
		case 1:
			b := make([]byte, 3000)
			for j := range b {
				b[j] = byte(j*j*7 + i*13 + j>>3)
			}
			raw = append(raw, b...)
		case 2:
			raw = append(raw, make([]byte, 70000)...)
		case 3:
			raw = append(raw, bytes.Repeat([]byte{byte(i)}, 5000)...)
		}
	}
	raw = raw[:8<<20]
	if err := os.WriteFile(filepath.Join(dir, "in.raw"), raw, 0o644); err != nil {
		t.Fatal(err)
	}
	usage := func(name string) int64 {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return diskUsage(st)
	}
	for _, ct := range []string{"zlib", "zstd"} {
		o := "compression_type=" + ct
		theirs, ours := "q-"+ct+".qcow2", "o-"+ct+".qcow2"
		mustRun(t, dir, qi, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", o, "in.raw", theirs)
		// qemu-img's image, read by us.
		mustRun(t, dir, bin, "image", "convert", "-O", "raw", theirs, "back-"+ct+".raw")
		if got, err := os.ReadFile(filepath.Join(dir, "back-"+ct+".raw")); err != nil || !bytes.Equal(got, raw) {
			t.Errorf("%s: qemu-img's compressed image reads back wrong (%v)", ct, err)
		}
		// Ours, read by qemu-img.
		mustRun(t, dir, bin, "image", "convert", "-c", "-O", "qcow2", "-o", o, "in.raw", ours)
		mustRun(t, dir, qi, "check", ours)
		mustRun(t, dir, qi, "compare", "-f", "raw", "-F", "qcow2", "in.raw", ours)
		if out, _, _ := runIn(t, dir, qi, "info", ours); !strings.Contains(out, "compression type: "+ct) {
			t.Errorf("%s: qemu-img info of ours:\n%s", ct, out)
		}
		q, g := usage(theirs), usage(ours)
		t.Logf("%s: qemu-img %d bytes on disk, ours %d (%+.1f%%)", ct, q, g, float64(g-q)*100/float64(q))
		// Packed as qemu packs them, with a deflate of qemu's window and
		// zstd at qemu's level: within 5% of qemu-img's size.
		if g > q*105/100 {
			t.Errorf("%s: ours takes %d bytes on disk, qemu-img's %d", ct, g, q)
		}
	}
	// An empty zstd image made by us, written by qemu-io, read by us.
	mustRun(t, dir, bin, "image", "create", "-f", "qcow2", "-o", "compression_type=zstd", "e.qcow2", "8M")
	mustRun(t, dir, qio, "-c", "write -c -P 0x61 0 64k", "-c", "write -P 0x62 1M 4k", "e.qcow2")
	mustRun(t, dir, bin, "image", "convert", "-O", "raw", "e.qcow2", "e.raw")
	got, err := os.ReadFile(filepath.Join(dir, "e.raw"))
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 8<<20)
	copy(want, bytes.Repeat([]byte{0x61}, 64<<10))
	copy(want[1<<20:], bytes.Repeat([]byte{0x62}, 4096))
	if !bytes.Equal(got, want) {
		t.Error("qemu-io's compressed write into our zstd image reads back wrong")
	}
	if out, _, _ := runIn(t, dir, qi, "check", "--output=json", "e.qcow2"); !strings.Contains(out, `"compressed-clusters": 1`) {
		t.Errorf("qemu-io's write -c left no compressed cluster:\n%s", out)
	}
}

// TestQemuImgCompareOracle: compare's message and exit status (0 same, 1
// different, 2 could not compare) equal qemu-img's on the same pairs:
// equal content in different formats, a difference inside a cluster,
// different sizes with a zero tail and with data in it, strict mode's
// size and allocation checks, a missing file, -q.
func TestQemuImgCompareOracle(t *testing.T) {
	bin := imageBinary(t)
	dir := t.TempDir()
	qi := oracle.Require(t, "qemu-img")
	qio := oracle.Require(t, "qemu-io")
	mustRun(t, dir, qi, "create", "-q", "-f", "raw", "a.raw", "4M")
	mustRun(t, dir, qio, "-f", "raw", "-c", "write -P 1 0 64k", "-c", "write -P 3 1M 4k", "a.raw")
	mustRun(t, dir, qi, "convert", "-O", "qcow2", "a.raw", "same.qcow2")
	mustRun(t, dir, qi, "convert", "-O", "vpc", "a.raw", "same.vhd")
	mustRun(t, dir, qi, "convert", "-O", "qcow2", "a.raw", "diff.qcow2")
	mustRun(t, dir, qio, "-c", "write -P 2 70001 10", "diff.qcow2")
	mustRun(t, dir, qi, "create", "-q", "-f", "raw", "long.raw", "5M")
	mustRun(t, dir, qio, "-f", "raw", "-c", "write -P 1 0 64k", "-c", "write -P 3 1M 4k", "long.raw")
	mustRun(t, dir, qi, "create", "-q", "-f", "raw", "longer.raw", "5M")
	mustRun(t, dir, qio, "-f", "raw", "-c", "write -P 1 0 64k", "-c", "write -P 3 1M 4k", "-c", "write -P 9 4200000 1", "longer.raw")
	mustRun(t, dir, qi, "create", "-q", "-f", "qcow2", "zero.qcow2", "4M")
	mustRun(t, dir, qio, "-c", "write -z 0 4M", "zero.qcow2")
	mustRun(t, dir, qi, "create", "-q", "-f", "qcow2", "empty.qcow2", "4M")
	for _, args := range [][]string{
		{"a.raw", "same.qcow2"}, {"same.qcow2", "a.raw"}, {"-f", "raw", "-F", "vpc", "a.raw", "same.vhd"},
		{"a.raw", "diff.qcow2"}, {"-q", "a.raw", "diff.qcow2"},
		{"a.raw", "long.raw"}, {"long.raw", "a.raw"}, {"a.raw", "longer.raw"},
		{"-s", "a.raw", "long.raw"}, {"-s", "a.raw", "a.raw"}, {"-s", "a.raw", "same.qcow2"},
		{"-s", "zero.qcow2", "empty.qcow2"}, {"zero.qcow2", "empty.qcow2"},
		{"a.raw", "missing.raw"},
	} {
		want, _, wrc := runIn(t, dir, qi, append([]string{"compare"}, args...)...)
		got, gerr, grc := runIn(t, dir, bin, append([]string{"image", "compare"}, args...)...)
		if want != got || wrc != grc {
			t.Errorf("compare %v:\nqemu-img exit %d: %q\nours exit %d: %q (%s)", args, wrc, want, grc, got, gerr)
		}
	}
}

// TestQemuImgMeasureOracle: measure's JSON, human text and exit status
// equal qemu-img's, for images of every kind as the source and for
// --size, into qcow2 (with its options) and raw.
func TestQemuImgMeasureOracle(t *testing.T) {
	bin := imageBinary(t)
	dir := t.TempDir()
	qi := oracle.Require(t, "qemu-img")
	var cases [][]string
	for _, im := range qemuImages(t, dir) {
		src := []string{im[0]}
		if im[1] != "" {
			src = []string{"-f", im[1], im[0]}
		}
		cases = append(cases, append([]string{"-O", "qcow2"}, src...), append([]string{"-O", "raw"}, src...),
			append([]string{"-O", "qcow2", "-o", "cluster_size=4k"}, src...))
	}
	cases = append(cases,
		[]string{"-O", "qcow2", "--size", "1G"}, []string{"-O", "qcow2", "-o", "cluster_size=2M", "--size", "100T"},
		[]string{"-O", "qcow2", "-o", "refcount_bits=1,cluster_size=512", "--size", "3G"},
		[]string{"-O", "qcow2", "-o", "compat=0.10", "a.qcow2"}, []string{"-O", "raw", "--size", "1000001"},
		[]string{"-O", "vpc", "--size", "1G"}, []string{"-O", "vmdk", "a.qcow2"})
	for _, args := range cases {
		for _, o := range []string{"--output=json", "--output=human"} {
			want, werr, wrc := runIn(t, dir, qi, append([]string{"measure", o}, args...)...)
			got, gerr, grc := runIn(t, dir, bin, append([]string{"image", "measure", o}, args...)...)
			if wrc != grc {
				t.Errorf("measure %s %v: exit qemu-img %d (%s), ours %d (%s)", o, args, wrc, werr, grc, gerr)
				continue
			}
			if wrc != 0 {
				continue
			}
			if o == "--output=json" {
				compareJSON(t, fmt.Sprintf("measure %v", args), want, got)
			} else if want != got {
				t.Errorf("measure %v:\nqemu-img:\n%sours:\n%s", args, want, got)
			}
		}
	}
}
