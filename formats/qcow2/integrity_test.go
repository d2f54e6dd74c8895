package qcow2

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/imagetest"
	"github.com/blktap-go/blktap/internal/oracle"
)

// damaged builds, with qemu-img and qemu-io, a 4 MiB image with 64 KiB
// clusters holding 0xaa at guest 0 and 0xbb at guest 1 MiB, then breaks
// it. qemu's layout: header 0, refcount table 0x10000, refcount block
// 0x20000, L1 0x30000, L2 0x40000, data 0x50000 and 0x60000.
func damaged(t *testing.T, compat string, breakIt func(b []byte)) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "d.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat="+compat, p, "4M")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 64k", "-c", "write -P 0xbb 1M 64k", p)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if got := binary.BigEndian.Uint64(b[0x30000:]) & offsetMask; got != 0x40000 {
		t.Fatalf("qemu laid the image out differently (L2 at %#x)", got)
	}
	breakIt(b)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// The two images from issue 16.
var damages = []struct {
	name string
	make func(b []byte)
}{
	// Refcount table entry 0 names the refcount table's own cluster.
	{"reftable-points-at-itself", func(b []byte) { be64(b, 0x10000, 0x10000) }},
	// The L2 table's refcount is 0: an allocator trusting refcounts
	// hands its cluster out for data.
	{"l2-refcount-zero", func(b []byte) { b[0x20000+8], b[0x20000+9] = 0, 0 }},
}

// qemuCounts is qemu-img check's count of corruptions and leaks.
func qemuCounts(t *testing.T, path string) (corruptions, leaks int) {
	t.Helper()
	out, _ := exec.Command(oracle.Require(t, "qemu-img"), "check", "--output=json", "-f", "qcow2", path).Output()
	var r struct {
		Corruptions int `json:"corruptions"`
		Leaks       int `json:"leaks"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("qemu-img check output %q: %v", out, err)
	}
	return r.Corruptions, r.Leaks
}

func qemuCorruptions(t *testing.T, path string) int {
	t.Helper()
	c, _ := qemuCounts(t, path)
	return c
}

func ourCorruptions(t *testing.T, path string) int64 {
	t.Helper()
	r, err := Check(path, CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return r.Corruptions
}

func markedCorrupt(t *testing.T, path string) bool {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return binary.BigEndian.Uint64(b[72:])&incCorrupt != 0
}

func wantRefused(t *testing.T, what string, err error) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: succeeded on a damaged image", what)
	}
	if !errors.Is(err, image.ErrCorrupt) || !strings.Contains(err.Error(), RepairHint) {
		t.Fatalf("%s: got %v, want a corruption naming %q", what, err, RepairHint)
	}
}

// TestDamagedImagesRefuseWrites: on both damaged images, a write that
// would land on metadata is refused, the image is marked corrupt (and
// then refused read-write, allowed read-only), qemu-img check and our
// check count the same corruptions as before, and everything acknowledged
// before the refusal reads back.
func TestDamagedImagesRefuseWrites(t *testing.T) {
	for _, compat := range []string{"1.1", "0.10"} {
		for _, d := range damages {
			t.Run(d.name+"/compat="+compat, func(t *testing.T) {
				damagedRefuses(t, compat, d.name, d.make)
			})
		}
	}
}

func damagedRefuses(t *testing.T, compat, name string, damage func([]byte)) {
	p := damaged(t, compat, damage)
	qBefore, oBefore := qemuCorruptions(t, p), ourCorruptions(t, p)
	if qBefore == 0 || oBefore == 0 {
		t.Fatalf("the damage went unnoticed: qemu %d, ours %d corruptions", qBefore, oBefore)
	}
	orig, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	qemuRefusesToo(t, orig)
	want := refusedWrites(t, p)
	if compat == "1.1" {
		if !markedCorrupt(t, p) {
			t.Fatal("corrupt bit not set")
		}
		_, err := Open(p, Options{})
		wantRefused(t, "read-write open of a marked image", err)
	} else if now, _ := os.ReadFile(p); len(now) < len(orig) {
		t.Fatal("file shrank")
	}

	ro, err := Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatalf("read-only open: %v", err)
	}
	got := make([]byte, len(want))
	_, rerr := ro.ReadAt(got, 0)
	ro.Close()
	if name == "l2-refcount-zero" {
		if rerr != nil {
			t.Fatal(rerr)
		}
		sameBytes(t, "after the refused write", got, want)
	}
	if q := qemuCorruptions(t, p); q != qBefore {
		t.Fatalf("qemu-img check: %d corruptions, %d before", q, qBefore)
	}
	if o := ourCorruptions(t, p); o != oBefore {
		t.Fatalf("our check: %d corruptions, %d before", o, oBefore)
	}
	// Only the header's feature word and the acknowledged
	// in-place write may have changed.
	now, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(orig); off++ {
		if now[off] != orig[off] && !(off >= 72 && off < 80) && !(off >= 0x50000+8192 && off < 0x50000+12288) {
			t.Fatalf("byte %#x changed (%#x -> %#x)", off, orig[off], now[off])
		}
	}

	// A repair that cannot fix the damage leaves it as it was.
	if _, err := Check(p, CheckOptions{Repair: RepairLeaks}); err != nil {
		t.Logf("repair: %v", err)
	}
	if q := qemuCorruptions(t, p); q > qBefore {
		t.Fatalf("after our repair qemu-img check finds %d corruptions, %d before", q, qBefore)
	}
}

// qemuRefusesToo: qemu refuses the same allocating write on a copy.
func qemuRefusesToo(t *testing.T, orig []byte) {
	qp := filepath.Join(t.TempDir(), "q.qcow2")
	if err := os.WriteFile(qp, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	qout, _ := exec.Command(oracle.Require(t, "qemu-io"), "-f", "qcow2", "-c", "write -P 0xcc 2M 4k", qp).CombinedOutput()
	if !strings.Contains(string(qout), "write failed") {
		t.Fatalf("qemu-io wrote to the damaged image:\n%s", qout)
	}
}

// refusedWrites: rewriting an allocated cluster touches no metadata and
// is acknowledged; a new cluster is refused, and so is everything after.
// It returns what the image must read as.
func refusedWrites(t *testing.T, p string) []byte {
	want := make([]byte, 4<<20)
	copy(want, bytes.Repeat([]byte{0xaa}, 64<<10))
	copy(want[1<<20:], bytes.Repeat([]byte{0xbb}, 64<<10))
	img, err := Open(p, Options{})
	if err == nil {
		// Rewriting an allocated cluster touches no metadata
		// and is acknowledged; a new cluster is refused.
		if _, err := img.WriteAt(bytes.Repeat([]byte{0x11}, 4096), 8192); err != nil {
			t.Fatalf("in-place write: %v", err)
		}
		copy(want[8192:], bytes.Repeat([]byte{0x11}, 4096))
		_, err = img.WriteAt(bytes.Repeat([]byte{0xcc}, 4096), 2<<20)
		wantRefused(t, "allocating write", err)
		_, err = img.WriteAt([]byte{1}, 8192)
		wantRefused(t, "write after the refusal", err)
		wantRefused(t, "discard after the refusal", img.Discard(0, 64<<10))
		if err := img.Flush(); err != nil {
			t.Fatalf("flush: %v", err)
		}
		if err := img.Close(); err != nil {
			t.Fatalf("close: %v", err)
		}
	} else {
		wantRefused(t, "open", err)
	}
	return want
}

// TestCorruptBitRepair: a marked image whose damage a repair fixes gets
// its corrupt bit cleared and opens read-write again.
func TestCorruptBitRepair(t *testing.T) {
	p := damaged(t, "1.1", func(b []byte) { be64(b, 72, incCorrupt) })
	_, err := Open(p, Options{})
	wantRefused(t, "open", err)
	ro, err := Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatalf("read-only open: %v", err)
	}
	ro.Close()
	r, err := Check(p, CheckOptions{Repair: RepairLeaks})
	if err != nil || !r.Clean() {
		t.Fatalf("repair: %v %+v", err, r)
	}
	if markedCorrupt(t, p) {
		t.Fatal("corrupt bit still set after a clean repair")
	}
	img, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt([]byte{1}, 3<<20); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	requireQemuClean(t, p)
}

// TestOverlapCheckBeforeMetadataWrite: an L1 entry naming the refcount
// block as an L2 table is found on open; one naming a data cluster's
// neighbour which the refcount block claims is found when a new cluster
// would be handed out. Neither write reaches the file.
func TestOverlapCheckBeforeMetadataWrite(t *testing.T) {
	t.Run("l2-is-refblock", func(t *testing.T) {
		p := damaged(t, "1.1", func(b []byte) { be64(b, 0x30000, 0x20000|entryCopied) })
		orig, _ := os.ReadFile(p)
		_, err := Open(p, Options{})
		wantRefused(t, "open", err)
		now, _ := os.ReadFile(p)
		be64(orig, 72, incCorrupt)
		if !bytes.Equal(orig, now) {
			t.Fatal("the image changed beyond its corrupt bit")
		}
	})
	t.Run("reftable-entry-on-l1", func(t *testing.T) {
		// A second refcount table entry naming the L1 table: only a
		// refcount update for clusters 32768+ would write it.
		p := damaged(t, "1.1", func(b []byte) { be64(b, 0x10008, 0x30000) })
		_, err := Open(p, Options{})
		wantRefused(t, "open", err)
	})
}

// TestRepairAfterRefusal: the L2 table whose refcount is 0 is marked
// corrupt by the refused write; the repair the error names raises the
// refcount, clears the bit, and the image then takes the write, with
// qemu-img check clean and every byte as written.
func TestRepairAfterRefusal(t *testing.T) {
	p := damaged(t, "1.1", damages[1].make)
	img, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = img.WriteAt([]byte{0xcc}, 2<<20)
	wantRefused(t, "allocating write", err)
	img.Close()
	if !markedCorrupt(t, p) {
		t.Fatal("not marked")
	}
	r, err := Check(p, CheckOptions{Repair: RepairLeaks})
	if err != nil || !r.Clean() || r.CorruptionsFixed == 0 {
		t.Fatalf("repair: %v %+v", err, r)
	}
	if markedCorrupt(t, p) {
		t.Fatal("still marked after a clean repair")
	}
	requireQemuClean(t, p)
	img, err = Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(bytes.Repeat([]byte{0xcc}, 4096), 2<<20); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	requireQemuClean(t, p)
	want := make([]byte, 4<<20)
	copy(want, bytes.Repeat([]byte{0xaa}, 64<<10))
	copy(want[1<<20:], bytes.Repeat([]byte{0xbb}, 64<<10))
	copy(want[2<<20:], bytes.Repeat([]byte{0xcc}, 4096))
	sameBytes(t, "qemu's view after the repair", qemuRaw(t, p), want)
}

// TestRefusalWritesNoRefcounts: the L2 table moved to cluster 8 with
// refcount 0, cluster 7 free. Filling the allocation pool takes 7, then
// meets the table: the refusal must not write cluster 7's refcount (a new
// leak) or anything else but the corrupt bit.
func TestRefusalWritesNoRefcounts(t *testing.T) {
	p := damaged(t, "1.1", func([]byte) {})
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b = append(b, make([]byte, 0x90000-len(b))...)
	copy(b[0x80000:0x90000], b[0x40000:0x50000])
	be64(b, 0x30000, 0x80000|entryCopied)
	be16(b, 0x20000+2*4, 0) // the old table's cluster: free
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	cBefore, lBefore := qemuCounts(t, p)
	img, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = img.WriteAt([]byte{1}, 2<<20)
	wantRefused(t, "allocating write", err)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	now, _ := os.ReadFile(p)
	be64(b, 72, incCorrupt)
	if !bytes.Equal(now[:len(b)], b) {
		t.Fatalf("bytes changed beyond the corrupt bit (first at %#x)", imagetest.FirstDiff(now, b))
	}
	if c, l := qemuCounts(t, p); c != cBefore || l != lBefore {
		t.Fatalf("qemu-img check: %d corruptions, %d leaks; before %d, %d", c, l, cBefore, lBefore)
	}
}
