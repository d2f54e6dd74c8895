package qcow2

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/internal/oracle"
)

// qemu-compatible locks: while we write an image, qemu refuses to open it
// and so do we; readers coexist.
func TestLocking(t *testing.T) {
	p := filepath.Join(t.TempDir(), "lock.qcow2")
	if err := Create(p, CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	w, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	qimg := oracle.Require(t, "qemu-io")
	out, err := exec.Command(qimg, "-f", "qcow2", "-c", "write 0 512", p).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "lock") {
		t.Fatalf("qemu-io wrote while we held the image: %v %s", err, out)
	}
	if _, err := Open(p, Options{}); !errors.Is(err, ErrLocked) {
		t.Fatalf("second writer: %v", err)
	}
	if _, err := Open(p, Options{ReadOnly: true}); !errors.Is(err, ErrLocked) {
		t.Fatalf("reader while writing: %v", err)
	}
	if _, err := Check(p, CheckOptions{Repair: RepairLeaks}); !errors.Is(err, ErrLocked) {
		t.Fatalf("repair while writing: %v", err)
	}
	w.Close()
	r1, err := Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer r1.Close()
	r2, err := Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	r2.Close()
	run(t, "qemu-img", "info", p) // a qemu reader coexists with ours
	if _, err := Open(p, Options{}); !errors.Is(err, ErrLocked) {
		t.Fatalf("writer while reading: %v", err)
	}
}

// A process that dies without Close leaves leaked clusters only; Check
// finds them like qemu-img check, and RepairLeaks fixes them.
func TestCheckRepairLeaks(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "k.qcow2")
	img, err := CreateImage(p, CreateOptions{Size: 4 << 20, ClusterSize: 4096}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(make([]byte, 3), 100); err != nil {
		t.Fatal(err)
	}
	img.f.Close() // no Close: reserved clusters stay counted
	// qemu-img check looks only inside the file; reserved clusters lie
	// past its end, so extend it to make qemu count them too.
	if err := os.Truncate(p, 2<<20); err != nil {
		t.Fatal(err)
	}
	code, out := qemuCheck(t, p)
	if code != 3 || !strings.Contains(out, "leaked clusters") {
		t.Fatalf("qemu-img check: exit %d\n%s", code, out)
	}
	res, err := Check(p, CheckOptions{})
	if err != nil || res.Corruptions != 0 || res.Leaks == 0 {
		t.Fatalf("check: %v %+v", err, res)
	}
	if !strings.Contains(out, fmt.Sprintf("%d leaked clusters", res.Leaks)) {
		t.Fatalf("we found %d leaks, qemu-img: %s", res.Leaks, out)
	}
	res, err = Check(p, CheckOptions{Repair: RepairLeaks})
	if err != nil || res.LeaksFixed != res.Leaks || !res.Clean() {
		t.Fatalf("repair: %v %+v", err, res)
	}
	requireQemuClean(t, p)
}

// Check reports corruption that qemu-img check also reports.
func TestCheckFindsCorruption(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "x.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p, "1M")
	qemuIO(t, p, "write -P 1 0 8192")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	// Point guest cluster 1 at guest cluster 0's host cluster: two
	// references, refcount 1.
	img, err := Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	l2 := int64(img.mu.l1[0] & offsetMask)
	img.Close()
	copy(b[l2+8:l2+16], b[l2:l2+8])
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	code, _ := qemuCheck(t, p)
	res, err := Check(p, CheckOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if code != 2 || res.Corruptions == 0 {
		t.Fatalf("qemu exit %d, ours %+v", code, res)
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatal(err)
	}
}
