package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/internal/oracle"
	"github.com/blktap-go/blktap/tapengine/worker"
)

// backingFields is what qemu-img info --output=json says of the backing
// file.
func backingFields(t *testing.T, dir, qi, file string) map[string]any {
	t.Helper()
	out, se, rc := runIn(t, dir, qi, "info", "--output=json", file)
	if rc != 0 {
		t.Fatalf("qemu-img info %s: exit %d: %s", file, rc, se)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatal(err)
	}
	got := map[string]any{}
	for _, k := range []string{"backing-filename", "full-backing-filename", "backing-filename-format"} {
		got[k] = m[k]
	}
	return got
}

// sameAsQemu: qemu-img compare says the two images read the same, and
// qemu-img check finds ours clean.
func sameAsQemu(t *testing.T, dir, qi, want, got string) {
	t.Helper()
	if out, _, rc := runIn(t, dir, qi, "compare", want, got); rc != 0 {
		t.Errorf("qemu-img compare %s %s: exit %d: %s", want, got, rc, out)
	}
	if out, se, rc := runIn(t, dir, qi, "check", got); rc != 0 {
		t.Errorf("qemu-img check %s: exit %d: %s%s", got, rc, out, se)
	}
}

// rebaseFixture lays out, in dir: old.qcow2 and new.qcow2 (each with data
// of its own, partly equal, new.qcow2 shorter), and top.EXT over
// old.qcow2 with data and a zero cluster of its own.
func rebaseFixture(t *testing.T, dir, qi, qio, topFmt string, topOpts ...string) string {
	t.Helper()
	mustRun(t, dir, qi, "create", "-q", "-f", "qcow2", "old.qcow2", "4M")
	mustRun(t, dir, qio, "-c", "write -P 0x11 0 1M", "-c", "write -P 0x12 3M 64k", "-c", "write -P 0x13 3968k 128k", "old.qcow2")
	mustRun(t, dir, qi, "create", "-q", "-f", "qcow2", "new.qcow2", "3M")
	mustRun(t, dir, qio, "-c", "write -P 0x11 0 256k", "-c", "write -P 0x22 512k 1M", "new.qcow2")
	top := "top." + topFmt
	args := append([]string{"create", "-q", "-f", topFmt, "-b", "old.qcow2", "-F", "qcow2"}, topOpts...)
	mustRun(t, dir, qi, append(args, top, "4M")...)
	mustRun(t, dir, qio, "-f", topFmt, "-c", "write -P 0x33 768k 64k", "-c", "write -P 0x34 2M 4k", "-c", "write -z 3M 64k", top)
	return top
}

// qemuTools builds the binary and finds qemu-img and qemu-io: what the
// image tests run side by side with the binary.
func qemuTools(t *testing.T) (bin, qemuImg, qemuIO string) {
	t.Helper()
	return imageBinary(t), oracle.Require(t, "qemu-img"), oracle.Require(t, "qemu-io")
}

// TestQemuImgRebaseOracle: on copies of one qcow2 overlay, `image rebase`
// and `qemu-img rebase` (onto another image, onto none, -u, a relative
// name from a subdirectory) leave images qemu-img compare calls identical,
// reading what the overlay read before (safe mode), clean by qemu-img
// check, with the same backing fields in qemu-img info.
func TestQemuImgRebaseOracle(t *testing.T) {
	bin, qi, qio := qemuTools(t)
	for _, tc := range []struct {
		name string
		opts []string // of the overlay
		args []string // of rebase
		safe bool
	}{
		{"onto-new", nil, []string{"-b", "new.qcow2", "-F", "qcow2"}, true},
		{"onto-new-v2", []string{"-o", "compat=0.10"}, []string{"-b", "new.qcow2", "-F", "qcow2"}, true},
		{"onto-new-4k", []string{"-o", "cluster_size=4096"}, []string{"-b", "new.qcow2", "-F", "qcow2"}, true},
		{"standalone", nil, []string{"-b", ""}, true},
		{"unsafe", nil, []string{"-u", "-b", "new.qcow2", "-F", "qcow2"}, false},
		{"unsafe-missing", nil, []string{"-u", "-b", "gone/x.raw", "-F", "raw"}, false},
		{"relative", nil, []string{"-b", "sub/../new.qcow2", "-F", "qcow2"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			os.Mkdir(filepath.Join(dir, "sub"), 0o755)
			top := rebaseFixture(t, dir, qi, qio, "qcow2", tc.opts...)
			copyFile(t, filepath.Join(dir, top), filepath.Join(dir, "orig.qcow2"))
			copyFile(t, filepath.Join(dir, top), filepath.Join(dir, "q.qcow2"))
			mustRun(t, dir, qi, append(append([]string{"rebase"}, tc.args...), "q.qcow2")...)
			mustRun(t, dir, bin, append(append([]string{"image", "rebase"}, tc.args...), top)...)
			want, got := backingFields(t, dir, qi, "q.qcow2"), backingFields(t, dir, qi, top)
			if !equalJSON(want, got) {
				t.Errorf("backing fields: qemu-img's %v, ours %v", want, got)
			}
			if tc.name == "unsafe-missing" {
				return // neither can be read any more
			}
			sameAsQemu(t, dir, qi, "q.qcow2", top)
			if tc.safe {
				sameAsQemu(t, dir, qi, "orig.qcow2", top)
			}
			// Read back through qemu-io: the overlay's own data, the old
			// backing file's where new.qcow2 differs (safe) or the new
			// one's (unsafe).
			reads := []string{"read -P 0x33 768k 64k", "read -P 0x34 2M 4k", "read -P 0 3M 64k"}
			if tc.safe {
				reads = append(reads, "read -P 0x11 0 768k", "read -P 0x13 3968k 128k")
			} else {
				reads = append(reads, "read -P 0x22 512k 256k", "read -P 0 3968k 128k")
			}
			for _, r := range reads {
				if out, _, rc := runIn(t, dir, qio, "-r", "-c", r, top); rc != 0 || strings.Contains(out, "failed") {
					t.Errorf("qemu-io %q: exit %d: %s", r, rc, out)
				}
			}
		})
	}
}

func equalJSON(a, b any) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return bytes.Equal(x, y)
}

// TestImageRebaseQcow: qemu-img cannot rebase a qcow (v1) image ("Operation
// not supported"); ours can where the name fits before the L1 table, and
// qemu-img then reads the same content and the new name. A name that
// does not fit is refused and changes nothing.
func TestImageRebaseQcow(t *testing.T) {
	bin, qi, qio := qemuTools(t)
	dir := t.TempDir()
	top := rebaseFixture(t, dir, qi, qio, "qcow")
	copyFile(t, filepath.Join(dir, top), filepath.Join(dir, "orig.qcow"))
	mustRun(t, dir, bin, "image", "rebase", "-b", "new.qcow2", "-F", "qcow2", top)
	if got := backingFields(t, dir, qi, top)["backing-filename"]; got != "new.qcow2" {
		t.Errorf("backing-filename %v, want new.qcow2", got)
	}
	if out, _, rc := runIn(t, dir, qi, "compare", "orig.qcow", top); rc != 0 {
		t.Errorf("content changed: %s", out)
	}
	before, _ := os.ReadFile(filepath.Join(dir, top))
	os.Mkdir(filepath.Join(dir, "x"), 0o755)
	long := strings.Repeat("x/../", 40) + "new.qcow2"
	_, se, rc := runIn(t, dir, bin, "image", "rebase", "-b", long, "-F", "qcow2", top)
	if rc != 1 || !strings.Contains(se, "no room") {
		t.Errorf("a name past the L1 table: exit %d, %q (want 1, no room)", rc, se)
	}
	if after, _ := os.ReadFile(filepath.Join(dir, top)); !bytes.Equal(before, after) {
		t.Error("a refused rebase changed the image")
	}
	mustRun(t, dir, bin, "image", "rebase", "-b", "", top)
	if out, _, rc := runIn(t, dir, qi, "compare", "orig.qcow", top); rc != 0 {
		t.Errorf("standalone: content changed: %s", out)
	}
	if got := backingFields(t, dir, qi, top)["backing-filename"]; got != nil {
		t.Errorf("standalone: backing-filename %v", got)
	}
}

// TestQemuImgCommitOracle: `image commit` and `qemu-img commit` on copies
// of one chain leave bases and overlays qemu-img compare calls identical,
// clean by qemu-img check; the overlay is emptied (qemu-img map: nothing
// at depth 0) as qemu-img empties it, except with -d or -b (which implies
// -d in qemu-img 7.2, even naming the image's own backing file).
func TestQemuImgCommitOracle(t *testing.T) {
	bin, qi, qio := qemuTools(t)
	for _, tc := range []struct {
		name, topFmt string
		args         []string
		emptied      bool
	}{
		{"qcow2", "qcow2", nil, true},
		{"qcow2-drop", "qcow2", []string{"-d"}, false},
		{"qcow", "qcow", nil, true},
		{"qcow2-deeper-base", "qcow2", []string{"-b", "old.qcow2"}, false},
		{"qcow2-b-own-backing", "qcow2", []string{"-b", "old.qcow2"}, false}, // -b implies -d
		{"raw-base", "qcow2", nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var sides [2]string
			for i, who := range []string{"qemu", "ours"} {
				dir := filepath.Join(t.TempDir(), who)
				os.Mkdir(dir, 0o755)
				sides[i] = dir
				top := rebaseFixture(t, dir, qi, qio, tc.topFmt)
				if tc.name == "raw-base" {
					// old.qcow2's content in a raw file, as top's backing file.
					mustRun(t, dir, qi, "convert", "-O", "raw", "old.qcow2", "old.raw")
					mustRun(t, dir, qi, "rebase", "-u", "-b", "old.raw", "-F", "raw", top)
				}
				if tc.name == "qcow2-deeper-base" {
					// old.qcow2 <- mid.qcow2 <- top2.qcow2
					mustRun(t, dir, qi, "rebase", "-u", "-b", "old.qcow2", "-F", "qcow2", top)
					os.Rename(filepath.Join(dir, top), filepath.Join(dir, "mid.qcow2"))
					mustRun(t, dir, qi, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
					mustRun(t, dir, qio, "-c", "write -P 0x44 100k 8k", top)
				}
				copyFile(t, filepath.Join(dir, top), filepath.Join(dir, "orig"))
				prog, args := qi, []string{"commit"}
				if who == "ours" {
					prog, args = bin, []string{"image", "commit"}
				}
				so, se, rc := runIn(t, dir, prog, append(append(args, tc.args...), top)...)
				if rc != 0 || so != "Image committed.\n" {
					t.Fatalf("%s commit: exit %d: %q %s", who, rc, so, se)
				}
				if out, _, rc := runIn(t, dir, qi, "compare", "orig", top); rc != 0 {
					t.Errorf("%s: the overlay reads differently after commit: %s", who, out)
				}
				mapOut, _, _ := runIn(t, dir, qi, "map", "--output=json", top)
				if own := strings.Contains(mapOut, `"depth": 0`); own == tc.emptied {
					t.Errorf("%s: overlay emptied %v, want %v:\n%s", who, !own, tc.emptied, mapOut)
				}
			}
			top := "top." + tc.topFmt
			baseFile := "old.qcow2"
			if tc.name == "raw-base" {
				baseFile = "old.raw"
			}
			for _, f := range []string{baseFile, top} {
				a, b := filepath.Join(sides[0], f), filepath.Join(sides[1], f)
				if out, _, rc := runIn(t, sides[1], qi, "compare", a, b); rc != 0 {
					t.Errorf("%s: ours and qemu-img's differ: %s", f, out)
				}
			}
			if out, se, rc := runIn(t, sides[1], qi, "check", "old.qcow2"); rc != 0 && tc.name != "raw-base" {
				t.Errorf("qemu-img check of our base: exit %d: %s%s", rc, out, se)
			}
		})
	}
}

// TestImageRebaseCommitRefused: an image a worker holds (its lock), a
// missing -b or -F, a format that cannot change its backing file or be
// emptied, a qcow2 with an internal snapshot: each refused with a reason
// (exit 1; 2 for a usage error), the files unchanged.
func TestImageRebaseCommitRefused(t *testing.T) {
	bin, qi, qio := qemuTools(t)
	dir := t.TempDir()
	top := rebaseFixture(t, dir, qi, qio, "qcow2")
	mustRun(t, dir, bin, "image", "create", "-f", "vhd", "base.vhd", "4M")
	mustRun(t, dir, bin, "image", "create", "-f", "vhd", "-b", "base.vhd", "-F", "vhd", "child.vhd")
	read := func() map[string][]byte {
		m := map[string][]byte{}
		for _, f := range []string{top, "old.qcow2", "child.vhd", "base.vhd"} {
			m[f], _ = os.ReadFile(filepath.Join(dir, f))
		}
		return m
	}
	before := read()
	lock, err := worker.LockImage(filepath.Join(dir, top), false)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		args []string
		rc   int
		want string
	}{
		{[]string{"rebase", "-b", "new.qcow2", "-F", "qcow2", top}, 1, "in use"},
		{[]string{"commit", top}, 1, "in use"},
		{[]string{"rebase", "-b", "new.qcow2", top}, 2, "-F"},
		{[]string{"rebase", top}, 2, "must specify backing file"},
		{[]string{"rebase", "-u", "-b", "./old.qcow2", "-F", "qcow2", "old.qcow2"}, 1, "its own backing file"},
		{[]string{"rebase", "-u", "-b", "child.vhd", "-F", "vpc", "base.vhd"}, 1, "only a differencing disk"},
	} {
		_, se, rc := runIn(t, dir, bin, append([]string{"image"}, c.args...)...)
		if rc != c.rc || !strings.Contains(se, c.want) {
			t.Errorf("image %v: exit %d, %q (want %d, %q)", c.args, rc, se, c.rc, c.want)
		}
	}
	lock.Close()
	lock, err = worker.LockImage(filepath.Join(dir, "old.qcow2"), false)
	if err != nil {
		t.Fatal(err)
	}
	if _, se, rc := runIn(t, dir, bin, "image", "commit", top); rc != 1 || !strings.Contains(se, "in use") {
		t.Errorf("commit into a locked base: exit %d, %q", rc, se)
	}
	lock.Close()
	// A qcow2 with an internal snapshot is not emptied: refused before
	// old.qcow2 gets anything.
	mustRun(t, dir, qi, "create", "-q", "-f", "qcow2", "-b", "old.qcow2", "-F", "qcow2", "snap.qcow2")
	mustRun(t, dir, qio, "-c", "write -P 0x66 0 64k", "snap.qcow2")
	mustRun(t, dir, qi, "snapshot", "-c", "s1", "snap.qcow2")
	if _, se, rc := runIn(t, dir, bin, "image", "commit", "snap.qcow2"); rc != 1 || !strings.Contains(se, "internal snapshots") {
		t.Errorf("commit of an image with a snapshot: exit %d, %q", rc, se)
	}
	for f, b := range read() {
		if !bytes.Equal(before[f], b) {
			t.Errorf("%s changed", f)
		}
	}
}

// TestQemuImgRebaseLargerOverlay: an overlay larger than its old backing
// file reads zeros past the old file's end; rebased onto a file with data
// there, those zeros must be written into it. qemu-img compare: identical
// with the overlay before and with qemu-img's own rebase.
func TestQemuImgRebaseLargerOverlay(t *testing.T) {
	bin, qi, qio := qemuTools(t)
	dir := t.TempDir()
	mustRun(t, dir, qi, "create", "-q", "-f", "qcow2", "old.qcow2", "2M")
	mustRun(t, dir, qio, "-c", "write -P 0x11 0 2M", "old.qcow2")
	mustRun(t, dir, qi, "create", "-q", "-f", "qcow2", "new.qcow2", "4M")
	mustRun(t, dir, qio, "-c", "write -P 0x22 0 4M", "new.qcow2")
	mustRun(t, dir, qi, "create", "-q", "-f", "qcow2", "-b", "old.qcow2", "-F", "qcow2", "t.qcow2", "4M")
	copyFile(t, filepath.Join(dir, "t.qcow2"), filepath.Join(dir, "orig.qcow2"))
	copyFile(t, filepath.Join(dir, "t.qcow2"), filepath.Join(dir, "q.qcow2"))
	mustRun(t, dir, qi, "rebase", "-b", "new.qcow2", "-F", "qcow2", "q.qcow2")
	mustRun(t, dir, bin, "image", "rebase", "-b", "new.qcow2", "-F", "qcow2", "t.qcow2")
	sameAsQemu(t, dir, qi, "orig.qcow2", "t.qcow2")
	sameAsQemu(t, dir, qi, "q.qcow2", "t.qcow2")
	if out, _, rc := runIn(t, dir, qio, "-r", "-c", "read -P 0 2M 2M", "t.qcow2"); rc != 0 || strings.Contains(out, "failed") {
		t.Errorf("past the old backing file's end: %s", out)
	}
}
