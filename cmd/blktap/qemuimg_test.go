package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/blktap-go/blktap/internal/oracle"
)

var (
	qemuImgBinOnce sync.Once
	qemuImgBin     string
	qemuImgBinErr  error
)

// imageBinary builds cmd/blktap once for all the qemu-img comparisons.
func imageBinary(t *testing.T) string {
	t.Helper()
	qemuImgBinOnce.Do(func() {
		dir, err := os.MkdirTemp("", "blktap-qemuimg-")
		if err != nil {
			qemuImgBinErr = err
			return
		}
		qemuImgBin = filepath.Join(dir, "blktap")
		out, err := exec.Command("go", "build", "-o", qemuImgBin, ".").CombinedOutput()
		if err != nil {
			qemuImgBinErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if qemuImgBinErr != nil {
		t.Fatal(qemuImgBinErr)
	}
	return qemuImgBin
}

// runIn runs a program in dir and returns stdout, stderr and the exit
// status; only a failure to start it ends the test.
func runIn(t *testing.T, dir, prog string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(prog, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "TZ=UTC")
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	// Run returns an *exec.ExitError itself when the program ran.
	switch err := cmd.Run().(type) {
	case nil:
		return so.String(), se.String(), 0
	case *exec.ExitError:
		return so.String(), se.String(), err.ExitCode()
	default:
		t.Fatalf("%s %v: %v", prog, args, err)
	}
	return "", "", 0
}

// mustRun runs a setup command that has to succeed.
func mustRun(t *testing.T, dir, prog string, args ...string) {
	t.Helper()
	if so, se, rc := runIn(t, dir, prog, args...); rc != 0 {
		t.Fatalf("%s %v: exit %d\n%s%s", prog, args, rc, so, se)
	}
}

// compareJSON compares two JSON documents key by key and reports every
// key that one has and the other lacks or holds differently.
func compareJSON(t *testing.T, what, want, got string) {
	t.Helper()
	if strings.TrimSpace(want) == "" && strings.TrimSpace(got) == "" {
		return // neither printed a result: the check could not run
	}
	var w, g any
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatalf("%s: qemu-img's JSON: %v\n%s", what, err, want)
	}
	if err := json.Unmarshal([]byte(got), &g); err != nil {
		t.Fatalf("%s: our JSON: %v\n%s", what, err, got)
	}
	for _, d := range diffJSON("", w, g) {
		t.Errorf("%s: %s", what, d)
	}
}

func diffJSON(path string, w, g any) []string {
	switch wv := w.(type) {
	case map[string]any:
		gv, ok := g.(map[string]any)
		if !ok {
			return []string{fmt.Sprintf("%s: qemu-img has an object, we have %v", path, g)}
		}
		var keys []string
		for k := range wv {
			keys = append(keys, k)
		}
		for k := range gv {
			if _, ok := wv[k]; !ok {
				keys = append(keys, k)
			}
		}
		sort.Strings(keys)
		var out []string
		for _, k := range keys {
			a, inW := wv[k]
			b, inG := gv[k]
			switch {
			case !inG:
				out = append(out, fmt.Sprintf("%s.%s: qemu-img has %v, we lack the key", path, k, a))
			case !inW:
				out = append(out, fmt.Sprintf("%s.%s: we have %v, qemu-img lacks the key", path, k, b))
			default:
				out = append(out, diffJSON(path+"."+k, a, b)...)
			}
		}
		return out
	case []any:
		gv, ok := g.([]any)
		if !ok || len(gv) != len(wv) {
			return []string{fmt.Sprintf("%s: qemu-img has %d entries %v, we have %v", path, len(wv), w, g)}
		}
		var out []string
		for i := range wv {
			out = append(out, diffJSON(fmt.Sprintf("%s[%d]", path, i), wv[i], gv[i])...)
		}
		return out
	}
	// What is left are JSON scalars, comparable as they are.
	if w != g {
		return []string{fmt.Sprintf("%s: qemu-img has %v, we have %v", path, w, g)}
	}
	return nil
}

// qemuImages makes, with qemu's own tools, one image of each kind both
// tools read, and returns their names (relative to dir) with the -f to
// pass (only where probing cannot tell, as for a fixed VHD).
func qemuImages(t *testing.T, dir string) [][2]string {
	t.Helper()
	qi := oracle.Require(t, "qemu-img")
	qio := oracle.Require(t, "qemu-io")
	img := func(format, name, size string, opts ...string) {
		mustRun(t, dir, qi, append(append([]string{"create", "-q", "-f", format}, opts...), name, size)...)
	}
	write := func(format, name string, cmds ...string) {
		args := []string{"-f", format}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		mustRun(t, dir, qio, append(args, name)...)
	}
	img("qcow2", "a.qcow2", "64M")
	write("qcow2", "a.qcow2", "write -P 1 0 1M", "write -z 4M 1M", "write -P 2 9M 64k")
	mustRun(t, dir, qi, "snapshot", "-c", "snap1", "a.qcow2")
	img("qcow2", "v2.qcow2", "16M", "-o", "compat=0.10")
	write("qcow2", "v2.qcow2", "write -P 5 64k 64k")
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	img("qcow2", "sub/over.qcow2", "64M", "-b", "../a.qcow2", "-F", "qcow2")
	write("qcow2", "sub/over.qcow2", "write -P 7 512k 64k")
	// 4 KiB clusters and out-of-order writes: L2 tables and data
	// interleave, so fragmented-clusters is not 0.
	img("qcow2", "frag.qcow2", "32M", "-o", "cluster_size=4096")
	write("qcow2", "frag.qcow2", "write -P 1 8M 4k", "write -P 2 0 4k", "write -P 3 4k 4k", "write -P 4 16M 8k", "write -P 5 8k 4k")
	mustRun(t, dir, qi, "convert", "-c", "-O", "qcow2", "a.qcow2", "comp.qcow2")
	// qemu-io's abort leaves a lazy-refcounts image dirty, its refcounts
	// behind its L2 tables: dirty-flag true, and corruptions to check.
	img("qcow2", "dirty.qcow2", "16M", "-o", "lazy_refcounts=on")
	if _, se, rc := runIn(t, dir, qio, "-c", "write -P 9 0 64k", "-c", "abort", "dirty.qcow2"); rc == 0 {
		t.Fatalf("qemu-io abort exited 0: %s", se)
	}
	img("qcow", "x.qcow", "64M")
	write("qcow", "x.qcow", "write -P 1 0 1M", "write -P 2 8M 64k")
	img("vpc", "dyn.vhd", "64M")
	write("vpc", "dyn.vhd", "write -P 1 0 1M", "write -P 2 8M 64k")
	img("vpc", "fixed.vhd", "64M", "-o", "subformat=fixed")
	write("vpc", "fixed.vhd", "write -P 1 0 4k", "write -P 1 20M 64k")
	for _, sub := range []string{"monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "streamOptimized"} {
		img("vmdk", sub+".vmdk", "16M", "-o", "subformat="+sub)
		if sub != "streamOptimized" { // qemu writes those only by convert
			write("vmdk", sub+".vmdk", "write -P 1 0 1M", "write -P 2 8M 64k")
		}
	}
	img("raw", "x.raw", "64M")
	write("raw", "x.raw", "write -P 1 0 1M", "write -P 2 8M 64k")
	return [][2]string{
		{"a.qcow2", ""}, {"v2.qcow2", ""}, {"sub/over.qcow2", ""}, {"frag.qcow2", ""}, {"comp.qcow2", ""}, {"dirty.qcow2", ""},
		{"x.qcow", ""}, {"dyn.vhd", ""}, {"fixed.vhd", "vpc"},
		{"monolithicSparse.vmdk", ""}, {"monolithicFlat.vmdk", ""}, {"twoGbMaxExtentSparse.vmdk", ""},
		{"streamOptimized.vmdk", ""}, {"x.raw", ""},
	}
}

// TestQemuImgInfoMapOracle: info and map, JSON and human, of every kind
// of image, against qemu-img's own answers on the same files.
func TestQemuImgInfoMapOracle(t *testing.T) {
	bin := imageBinary(t)
	dir := t.TempDir()
	qi := oracle.Require(t, "qemu-img")
	for _, im := range qemuImages(t, dir) {
		name, f := im[0], im[1]
		fa := []string{}
		if f != "" {
			fa = []string{"-f", f}
		}
		t.Run(strings.ReplaceAll(name, "/", "_"), func(t *testing.T) {
			for _, sub := range []string{"info", "map"} {
				want, werr, wrc := runIn(t, dir, qi, append(append([]string{sub, "--output=json"}, fa...), name)...)
				got, gerr, grc := runIn(t, dir, bin, append(append([]string{"image", sub, "--output=json"}, fa...), name)...)
				if wrc != 0 || grc != 0 {
					t.Fatalf("%s: exit qemu-img %d (%s), ours %d (%s)", sub, wrc, werr, grc, gerr)
				}
				compareJSON(t, sub+" --output=json", want, got)
				if sub == "map" && want != got {
					t.Errorf("map --output=json text differs:\nqemu-img:\n%sours:\n%s", want, got)
				}
				// --json is kept as the old spelling of the same thing.
				if alias, _, _ := runIn(t, dir, bin, append(append([]string{"image", sub, "--json"}, fa...), name)...); alias != got {
					t.Errorf("%s --json differs from --output=json:\n%s\n%s", sub, alias, got)
				}
				want, werr, wrc = runIn(t, dir, qi, append(append([]string{sub}, fa...), name)...)
				got, gerr, grc = runIn(t, dir, bin, append(append([]string{"image", sub}, fa...), name)...)
				if wrc != grc {
					t.Errorf("%s: exit qemu-img %d (%s), ours %d (%s)", sub, wrc, werr, grc, gerr)
				}
				if want != got {
					t.Errorf("%s (human) differs:\nqemu-img:\n%sours:\n%s", sub, want, got)
				}
			}
		})
	}
}

// TestImageInfoDetail: --detail adds our own reading of the metadata
// after qemu-img's text, which stays unchanged.
func TestImageInfoDetail(t *testing.T) {
	bin := imageBinary(t)
	dir := t.TempDir()
	qemuImages(t, dir)
	plain, _, _ := runIn(t, dir, bin, "image", "info", "dyn.vhd")
	got, gerr, rc := runIn(t, dir, bin, "image", "info", "--detail", "dyn.vhd")
	if rc != 0 || !strings.HasPrefix(got, plain) {
		t.Fatalf("exit %d (%s); want qemu-img's text first:\n%s", rc, gerr, got)
	}
	var d map[string]any
	if err := json.Unmarshal([]byte(strings.TrimPrefix(got, plain)), &d); err != nil {
		t.Fatalf("detail is not one JSON object: %v\n%s", err, got)
	}
	if d["subformat"] != "dynamic" || d["uuid"] == "" {
		t.Errorf("detail lacks the VHD's subformat or uuid: %v", d)
	}
}

// TestQemuImgBackingChainOracle: info --backing-chain lists the chain top
// first, as qemu-img does.
func TestQemuImgBackingChainOracle(t *testing.T) {
	bin := imageBinary(t)
	dir := t.TempDir()
	qi := oracle.Require(t, "qemu-img")
	qemuImages(t, dir)
	want, _, wrc := runIn(t, dir, qi, "info", "--backing-chain", "--output=json", "sub/over.qcow2")
	got, gerr, grc := runIn(t, dir, bin, "image", "info", "--backing-chain", "--output=json", "sub/over.qcow2")
	if wrc != 0 || grc != 0 {
		t.Fatalf("exit qemu-img %d, ours %d (%s)", wrc, grc, gerr)
	}
	compareJSON(t, "info --backing-chain", want, got)
}

// qcow2 layout of a fresh 16 MiB image with 64 KiB clusters, as qemu-img
// 7.2 makes it: header, refcount table, refcount block, L1, then L2 and
// data. Refcounts are 16-bit, so cluster c's is at refBlock+2c.
const refBlock = 0x20000

func pokeRefcount(t *testing.T, path string, cluster int, v uint16) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte{byte(v >> 8), byte(v)}, refBlock+2*int64(cluster)); err != nil {
		t.Fatal(err)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestQemuImgCheckOracle: check's JSON, human summary and exit status (0
// clean, 2 corruption, 3 leaks, 1 could not check), and -r leaks|all, on
// the same damage given to one copy for qemu-img and one for us.
func TestQemuImgCheckOracle(t *testing.T) {
	bin := imageBinary(t)
	dir := t.TempDir()
	qi := oracle.Require(t, "qemu-img")
	qio := oracle.Require(t, "qemu-io")
	imgs := qemuImages(t, dir)

	// Clusters 0-5 are in use (the last is the 64 KiB of data); the
	// discarded megabyte left clusters 6-20 free in the file.
	mustRun(t, dir, qi, "create", "-q", "-f", "qcow2", "base.qcow2", "16M")
	mustRun(t, dir, qio, "-c", "write 0 1M", "-c", "discard 0 1M", "-c", "write -P 3 2M 64k", "base.qcow2")
	damage := map[string]func(p string){
		"clean":   func(string) {},
		"leak":    func(p string) { pokeRefcount(t, p, 8, 1); pokeRefcount(t, p, 9, 1) },
		"corrupt": func(p string) { pokeRefcount(t, p, 5, 0) },
		"both":    func(p string) { pokeRefcount(t, p, 5, 0); pokeRefcount(t, p, 8, 1) },
	}
	wantRC := map[string]int{"clean": 0, "leak": 3, "corrupt": 2, "both": 2}
	for name, hurt := range damage {
		for _, repair := range []string{"", "leaks", "all"} {
			t.Run(name+"-r"+repair, func(t *testing.T) {
				checkOracleDamage(t, bin, qi, dir, name, repair, hurt, wantRC[name])
			})
		}
	}
	t.Run("formats", func(t *testing.T) {
		checkOracleFormats(t, bin, qi, dir, imgs)
	})
	t.Run("cannot-check", func(t *testing.T) {
		checkOracleCannotCheck(t, bin, qi, dir)
	})
}

// checkOracleDamage gives one copy of base.qcow2 to qemu-img and one to
// us, both hurt the same way, and compares check [-r repair] and the
// check after it.
func checkOracleDamage(t *testing.T, bin, qi, dir, name, repair string, hurt func(string), wantRC int) {
	mine, theirs := name+repair+".ours.qcow2", name+repair+".qemu.qcow2"
	for _, p := range []string{mine, theirs} {
		copyFile(t, filepath.Join(dir, "base.qcow2"), filepath.Join(dir, p))
		hurt(filepath.Join(dir, p))
	}
	args := []string{"--output=json"}
	if repair != "" {
		args = append(args, "-r", repair)
	}
	want, werr, wrc := runIn(t, dir, qi, append(append([]string{"check"}, args...), theirs)...)
	got, gerr, grc := runIn(t, dir, bin, append(append([]string{"image", "check"}, args...), mine)...)
	if wrc != grc {
		t.Errorf("exit: qemu-img %d (%s), ours %d (%s)", wrc, werr, grc, gerr)
	}
	if repair == "" && grc != wantRC {
		t.Errorf("exit %d, want %d", grc, wantRC)
	}
	// The file names differ; everything else must not, but for
	// one thing: where a cluster in use has refcount 0, qemu's
	// -r all writes new refcount structures at the end of the
	// file and we fix the one entry in place, so the image ends
	// in a different place.
	want = strings.ReplaceAll(want, theirs, mine)
	if repair == "all" && (name == "corrupt" || name == "both") {
		want, got = dropKey(t, want, "image-end-offset"), dropKey(t, got, "image-end-offset")
	}
	compareJSON(t, "check", want, got)
	// After the repair both files must check the same again.
	want, _, wrc = runIn(t, dir, qi, "check", theirs)
	got, _, grc = runIn(t, dir, bin, "image", "check", mine)
	if repair == "all" && (name == "corrupt" || name == "both") {
		want, got = dropLine(want, "Image end offset:"), dropLine(got, "Image end offset:")
	}
	if wrc != grc || want != got {
		t.Errorf("human check after -r %q: qemu-img exit %d:\n%sours exit %d:\n%s", repair, wrc, want, grc, got)
	}
}

// checkOracleFormats: on every image qemuImages makes, the same check
// JSON, human summary and exit status as qemu-img (or, where qemu-img
// cannot check the format, a clean pass).
func checkOracleFormats(t *testing.T, bin, qi, dir string, imgs [][2]string) {
	for _, im := range imgs {
		name, f := im[0], im[1]
		fa := []string{}
		if f != "" {
			fa = []string{"-f", f}
		}
		want, _, wrc := runIn(t, dir, qi, append(append([]string{"check", "--output=json"}, fa...), name)...)
		if wrc == 63 {
			// qemu-img has no check for qcow, vpc or raw; ours must
			// still pass a clean image.
			if _, gerr, grc := runIn(t, dir, bin, append(append([]string{"image", "check"}, fa...), name)...); grc != 0 {
				t.Errorf("%s: exit %d (%s)", name, grc, gerr)
			}
			continue
		}
		got, gerr, grc := runIn(t, dir, bin, append(append([]string{"image", "check", "--output=json"}, fa...), name)...)
		if wrc != grc {
			t.Errorf("%s: exit qemu-img %d, ours %d (%s)", name, wrc, grc, gerr)
		}
		compareJSON(t, name, want, got)
		want, _, _ = runIn(t, dir, qi, append(append([]string{"check"}, fa...), name)...)
		got, _, _ = runIn(t, dir, bin, append(append([]string{"image", "check"}, fa...), name)...)
		if want != got {
			t.Errorf("%s: human check:\nqemu-img:\n%sours:\n%s", name, want, got)
		}
	}
}

// checkOracleCannotCheck: a missing or short image, and a mistyped
// command line, exit 1 with both.
func checkOracleCannotCheck(t *testing.T, bin, qi, dir string) {
	if err := os.WriteFile(filepath.Join(dir, "short.qcow2"), []byte("QFI\xfb\x00\x00\x00\x03"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"missing.qcow2", "short.qcow2"} {
		_, _, wrc := runIn(t, dir, qi, "check", p)
		_, gerr, grc := runIn(t, dir, bin, "image", "check", p)
		if wrc != 1 || grc != 1 {
			t.Errorf("%s: exit qemu-img %d, ours %d (%s); want 1", p, wrc, grc, gerr)
		}
	}
	// A mistyped command line is status 1 too: 2 would say corrupt.
	for _, args := range [][]string{{"--output=yaml", "a.qcow2"}, {"-r", "some", "a.qcow2"}} {
		_, _, wrc := runIn(t, dir, qi, append([]string{"check"}, args...)...)
		_, gerr, grc := runIn(t, dir, bin, append([]string{"image", "check"}, args...)...)
		if wrc != 1 || grc != 1 {
			t.Errorf("%v: exit qemu-img %d, ours %d (%s); want 1", args, wrc, grc, gerr)
		}
	}
}

// dropKey removes key from a JSON object (empty text stays empty: a
// check that failed printed none).
func dropKey(t *testing.T, doc, key string) string {
	t.Helper()
	if strings.TrimSpace(doc) == "" {
		return doc
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(doc), &m); err != nil {
		t.Fatalf("%v\n%s", err, doc)
	}
	delete(m, key)
	b, _ := json.Marshal(m)
	return string(b)
}

func dropLine(text, prefix string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if !strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestQemuImgHumanSizes: "virtual size" of raw images of awkward sizes,
// printed by both tools; qemu's rounding to three digits and its unit
// steps at 1000 of the smaller one are the point.
func TestQemuImgHumanSizes(t *testing.T) {
	bin := imageBinary(t)
	dir := t.TempDir()
	qi := oracle.Require(t, "qemu-img")
	sizes := []int64{0, 512, 999, 1000, 1023, 1024, 1025, 1000 << 10, 1023 << 10, 1 << 20, 1536 << 10,
		1<<30 - 512, 1 << 30, 1<<30 + 1<<29, 10<<30 + 7<<20, 999 << 30, 1000 << 30, 1 << 40, 7<<40 + 5<<30 + 512}
	for _, n := range sizes {
		name := fmt.Sprintf("s%d.raw", n)
		mustRun(t, dir, qi, "create", "-q", "-f", "raw", name, fmt.Sprint(n))
		want, _, _ := runIn(t, dir, qi, "info", "-f", "raw", name)
		got, gerr, _ := runIn(t, dir, bin, "image", "info", "-f", "raw", name)
		line := func(s string) string {
			for _, l := range strings.Split(s, "\n") {
				if strings.HasPrefix(l, "virtual size:") {
					return l
				}
			}
			return ""
		}
		if line(want) == "" || line(want) != line(got) {
			t.Errorf("size %d: qemu-img %q, ours %q (%s)", n, line(want), line(got), gerr)
		}
		os.Remove(filepath.Join(dir, name))
	}
}

func TestHumanSize(t *testing.T) {
	for n, want := range map[int64]string{
		0: "0 B", 1000: "0.977 KiB", 1023: "0.999 KiB", 200704: "196 KiB", 1310720: "1.25 MiB",
		1 << 30: "1 GiB", 1073741824 * 1000: "0.977 TiB",
	} {
		if got := humanSize(n); got != want {
			t.Errorf("humanSize(%d) = %q, want %q", n, got, want)
		}
	}
}
