package qcow2

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats/image"
)

// snapWrite writes pattern v over [off, off+n) through our code.
func snapWrite(t *testing.T, img *Image, v byte, off, n int64) {
	t.Helper()
	if _, err := img.WriteAt(bytes.Repeat([]byte{v}, int(n)), off); err != nil {
		t.Fatal(err)
	}
}

// qemuSnapshotNames is what qemu-img info --output=json lists.
func qemuSnapshotNames(t *testing.T, path string) []string {
	t.Helper()
	var info struct {
		Snapshots []struct {
			ID   string `json:"id"`
			Name string `json:"name"`
		} `json:"snapshots"`
	}
	if err := json.Unmarshal([]byte(run(t, "qemu-img", "info", "--output=json", path)), &info); err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, s := range info.Snapshots {
		out = append(out, s.ID+":"+s.Name)
	}
	return out
}

func qemuIORead(t *testing.T, path string, v byte, off, n int64) {
	t.Helper()
	cmd := "read -P " + itoa(int64(v)) + " " + itoa(off) + " " + itoa(n)
	if out := run(t, "qemu-io", "-f", "qcow2", "-c", cmd, path); strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("qemu-io %s on %s:\n%s", cmd, path, out)
	}
}

func itoa(v int64) string { return strconv.FormatInt(v, 10) }

// Snapshots we make are what qemu lists, reverts to and reads; writes
// after a snapshot leave its data alone; qemu-img check is clean after
// every step, for v3, v2 and 512-byte clusters.
func TestSnapshotsOursReadByQemu(t *testing.T) {
	for _, o := range []CreateOptions{
		{Size: 1 << 20, ClusterSize: 4096},
		{Size: 1 << 20, ClusterSize: 512, Compat: "0.10"},
		{Size: 3 << 20, ClusterSize: 65536, RefcountBits: 64},
	} {
		t.Run(o.Compat+itoa(o.ClusterSize), func(t *testing.T) { snapshotsOurs(t, o) })
	}
}

func snapshotsOurs(t *testing.T, o CreateOptions) {
	dir := t.TempDir()
	p := filepath.Join(dir, "a.qcow2")
	if err := Create(p, o); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	half := o.Size / 2
	snapWrite(t, img, 0x11, 0, half)
	if err := img.WriteCompressed(bytes.Repeat([]byte{0x33}, int(o.ClusterSize)), half); err != nil {
		t.Fatal(err)
	}
	if _, err := img.CreateSnapshot("s1", time.Now()); err != nil {
		t.Fatal(err)
	}
	snapWrite(t, img, 0x22, o.ClusterSize, 3*o.ClusterSize+100) // COW of shared clusters
	snapWrite(t, img, 0x22, half+o.ClusterSize, o.ClusterSize)  // new cluster
	if _, err := img.CreateSnapshot("s2", time.Now()); err != nil {
		t.Fatal(err)
	}
	snapWrite(t, img, 0x44, 0, o.ClusterSize)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	requireQemuClean(t, p)
	if got := strings.Join(qemuSnapshotNames(t, p), " "); got != "1:s1 2:s2" {
		t.Fatalf("qemu-img info lists %q", got)
	}
	if out := run(t, "qemu-img", "snapshot", "-l", p); !strings.Contains(out, "1         s1") || !strings.Contains(out, "2         s2") {
		t.Fatalf("qemu-img snapshot -l:\n%s", out)
	}
	// qemu reverts a copy to s1 and reads the data back.
	cp := filepath.Join(dir, "copy.qcow2")
	if b, err := os.ReadFile(p); err != nil || os.WriteFile(cp, b, 0o644) != nil {
		t.Fatalf("copy %s: %v", p, err)
	}
	run(t, "qemu-img", "snapshot", "-a", "s1", cp)
	qemuIORead(t, cp, 0x11, 0, half)
	qemuIORead(t, cp, 0x33, half, o.ClusterSize)
	qemuIORead(t, cp, 0, half+o.ClusterSize, o.ClusterSize)
	requireQemuClean(t, cp)

	// We revert to s2 by ID, delete s1, and qemu agrees on what is left.
	img, err = Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.ApplySnapshot("2"); err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte{0x11}, int(half))
	copy(want[o.ClusterSize:], bytes.Repeat([]byte{0x22}, int(3*o.ClusterSize+100)))
	want = append(want, bytes.Repeat([]byte{0x33}, int(o.ClusterSize))...)
	want = append(want, bytes.Repeat([]byte{0x22}, int(o.ClusterSize))...)
	want = append(want, make([]byte, o.Size-int64(len(want)))...)
	sameBytes(t, "after apply", readAll(t, img), want)
	if err := img.DeleteSnapshot("s1"); err != nil {
		t.Fatal(err)
	}
	snapWrite(t, img, 0x55, 0, 2*o.ClusterSize)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	requireQemuClean(t, p)
	if got := strings.Join(qemuSnapshotNames(t, p), " "); got != "2:s2" {
		t.Fatalf("after delete qemu-img info lists %q", got)
	}
	copy(want, bytes.Repeat([]byte{0x55}, int(2*o.ClusterSize)))
	sameBytes(t, "qemu reads", qemuRaw(t, p), want)
	run(t, "qemu-img", "snapshot", "-a", "s2", p)
	qemuIORead(t, p, 0x11, 0, o.ClusterSize)
	requireQemuClean(t, p)
}

// Snapshots qemu makes are listed, applied and deleted by us, and qemu
// finds the result clean.
func TestSnapshotsQemuMadeUsedByUs(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "q.qcow2")
	run(t, "qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", p, "1M")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 512k", p)
	run(t, "qemu-img", "snapshot", "-c", "first", p)
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x62 4096 8192", p)
	run(t, "qemu-img", "snapshot", "-c", "second", p)
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x63 0 1M", p)
	img, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	s := img.Snapshots()
	if len(s) != 2 || s[0].Name != "first" || s[1].ID != "2" || s[0].DiskSize != 1<<20 {
		t.Fatalf("snapshots %+v", s)
	}
	if err := img.ApplySnapshot("first"); err != nil {
		t.Fatal(err)
	}
	want := append(bytes.Repeat([]byte{0x61}, 512<<10), make([]byte, 512<<10)...)
	sameBytes(t, "first", readAll(t, img), want)
	if err := img.DeleteSnapshot("second"); err != nil {
		t.Fatal(err)
	}
	if err := img.DeleteSnapshot("nosuch"); !errors.Is(err, ErrNoSnapshot) {
		t.Fatalf("delete of a missing snapshot: %v", err)
	}
	if err := img.ApplySnapshot("2"); !errors.Is(err, ErrNoSnapshot) {
		t.Fatalf("apply of a deleted snapshot: %v", err)
	}
	snapWrite(t, img, 0x64, 0, 4096)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	requireQemuClean(t, p)
	if got := strings.Join(qemuSnapshotNames(t, p), " "); got != "1:first" {
		t.Fatalf("qemu-img info lists %q", got)
	}
	copy(want, bytes.Repeat([]byte{0x64}, 4096))
	sameBytes(t, "qemu reads", qemuRaw(t, p), want)
	run(t, "qemu-img", "snapshot", "-d", "first", p)
	requireQemuClean(t, p)
}

// A snapshot the refcount width cannot count is refused before anything
// is written.
func TestSnapshotRefcountOverflowRefused(t *testing.T) {
	p := filepath.Join(t.TempDir(), "r1.qcow2")
	if err := Create(p, CreateOptions{Size: 1 << 20, ClusterSize: 4096, RefcountBits: 1}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	snapWrite(t, img, 1, 0, 8192)
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(p)
	if _, err := img.CreateSnapshot("s", time.Now()); !errors.Is(err, image.ErrUnsupported) {
		t.Fatalf("snapshot with 1-bit refcounts: %v", err)
	}
	after, _ := os.ReadFile(p)
	if !bytes.Equal(before, after) {
		t.Fatal("a refused snapshot changed the file")
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	requireQemuClean(t, p)
}

// A snapshot whose L1 table names the refcount table as an L2 table is
// refused by apply and delete before anything is written.
func TestSnapshotOnMetadataRefused(t *testing.T) {
	p := filepath.Join(t.TempDir(), "bad.qcow2")
	if err := Create(p, CreateOptions{Size: 1 << 20, ClusterSize: 4096}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	snapWrite(t, img, 7, 0, 4096)
	sn, err := img.CreateSnapshot("s", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	refOff := img.hdr.refTableOffset
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	be64(b, int(sn.L1Offset), refOff)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	img, err = Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	for _, op := range []func() error{func() error { return img.ApplySnapshot("s") }, func() error { return img.DeleteSnapshot("s") }} {
		if err := op(); !errors.Is(err, image.ErrCorrupt) {
			t.Fatalf("operation on a snapshot whose L2 table is the refcount table: %v", err)
		}
		if after, _ := os.ReadFile(p); !bytes.Equal(after, b) {
			t.Fatal("a refused operation changed the file")
		}
	}
}
