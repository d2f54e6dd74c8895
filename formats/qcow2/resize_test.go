package qcow2

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/blktap-go/blktap/internal/oracle"
)

// qemuSize is the virtual size qemu-img info reads.
func qemuSize(t *testing.T, path string) int64 {
	t.Helper()
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(run(t, "qemu-img", "info", "-U", "--output=json", path)), &info); err != nil {
		t.Fatal(err)
	}
	return info.VirtualSize
}

func resizeOnce(t *testing.T, path string, size int64) {
	t.Helper()
	img, err := Open(path, Options{Backing: openerFor(path)})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Resize(size); err != nil {
		img.Close()
		t.Fatalf("resize to %d: %v", size, err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
}

// After each grow and shrink, qemu-img reads the new size, finds the image
// clean, and sees the old data up to the smaller size and zeros past it.
// Small clusters make the L1 table outgrow its cluster (64 entries of
// 32 KiB at 512 B clusters), so the table must move.
func TestResizeQemuReads(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	run(t, "qemu-img", "create", "-q", "-f", "raw", base, "8M")
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0xee 0 8M", base)
	cases := []struct {
		name, compat, backing string
		cs                    int64
	}{
		{"v3-cs512", "1.1", "", 512},
		{"v2-cs512", "0.10", "", 512},
		{"v3-64k", "1.1", "", 65536},
		{"v3-backing", "1.1", "base.raw", 4096},
		{"v2-backing", "0.10", "base.raw", 4096},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, c.name+".qcow2")
			args := []string{"create", "-q", "-f", "qcow2", "-o", "compat=" + c.compat + ",cluster_size=" + strconv.FormatInt(c.cs, 10)}
			if c.backing != "" {
				args = append(args, "-b", c.backing, "-F", "raw")
			}
			run(t, "qemu-img", append(args, p, "1M")...)
			run(t, "qemu-io", "-c", "write -P 0xa1 0 1M", p)
			// Grow to 5 MiB: zeros from 1 MiB on, the backing file hidden.
			resizeOnce(t, p, 5<<20)
			requireQemuClean(t, p)
			if got := qemuSize(t, p); got != 5<<20 {
				t.Fatalf("virtual size %d after grow", got)
			}
			want := append(bytes.Repeat([]byte{0xa1}, 1<<20), make([]byte, 4<<20)...)
			sameBytes(t, "after grow", qemuRaw(t, p), want)
			// Shrink to a size inside a cluster, then grow again: the
			// rest of that cluster must read as zeros.
			run(t, "qemu-io", "-c", "write -P 0xb2 1M 3M", p)
			resizeOnce(t, p, 3<<20+512)
			requireQemuClean(t, p)
			want = append(want[:1<<20], bytes.Repeat([]byte{0xb2}, 2<<20+512)...)
			sameBytes(t, "after shrink", qemuRaw(t, p), want)
			resizeOnce(t, p, 6<<20)
			requireQemuClean(t, p)
			want = append(want, make([]byte, 6<<20-len(want))...)
			sameBytes(t, "after regrow", qemuRaw(t, p), want)
		})
	}
}

// qemu-img resize's output is ours to read too: a file qemu grew (L1
// moved) and shrank opens, reads and checks clean here.
func TestResizeByQemuReadsHere(t *testing.T) {
	p := filepath.Join(t.TempDir(), "q.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p, "1M")
	run(t, "qemu-io", "-c", "write -P 0x5c 0 1M", p)
	run(t, "qemu-img", "resize", p, "6M")
	run(t, "qemu-img", "resize", "--shrink", p, "2M")
	res, err := Check(p, CheckOptions{})
	if err != nil || !res.Clean() {
		t.Fatalf("our check: %v %+v", err, res)
	}
	img, err := Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	want := append(bytes.Repeat([]byte{0x5c}, 1<<20), make([]byte, 1<<20)...)
	sameBytes(t, "qemu-resized image", readAll(t, img), want)
}

// As qemu: a version 2 image with internal snapshots is not resized; a
// version 3 one is, and its snapshot keeps its data.
func TestResizeSnapshots(t *testing.T) {
	dir := t.TempDir()
	for _, compat := range []string{"0.10", "1.1"} {
		p := filepath.Join(dir, compat+".qcow2")
		run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,compat="+compat, p, "1M")
		run(t, "qemu-io", "-c", "write -P 0x33 0 1M", p)
		run(t, "qemu-img", "snapshot", "-c", "s1", p)
		img, err := Open(p, Options{})
		if err != nil {
			t.Fatal(err)
		}
		err = img.Resize(256 << 10)
		if cerr := img.Close(); cerr != nil {
			t.Fatal(cerr)
		}
		if compat == "0.10" {
			if !errors.Is(err, ErrResizeSnapshots) {
				t.Fatalf("v2 with snapshots: %v, want ErrResizeSnapshots", err)
			}
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		requireQemuClean(t, p)
		if got := qemuSize(t, p); got != 256<<10 {
			t.Fatalf("size %d", got)
		}
		// Reverting brings back the snapshot's own size and data.
		run(t, "qemu-img", "snapshot", "-a", "s1", p)
		requireQemuClean(t, p)
		sameBytes(t, "reverted snapshot", qemuRaw(t, p), bytes.Repeat([]byte{0x33}, 1<<20))
	}
}

// An image another process holds for writing (a worker, qemu) is refused
// by the lock Open takes, before Resize could run.
func TestResizeRefusesLockedImage(t *testing.T) {
	p := filepath.Join(t.TempDir(), "l.qcow2")
	if err := Create(p, CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	qio := oracle.Require(t, "qemu-io")
	// qemu-io holds the image open (write lock) while it reads its stdin.
	cmd := exec.Command(qio, p)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stdin.Close(); cmd.Wait() }()
	// qemu-io prompts once the image is open (and locked).
	prompt := make([]byte, 9)
	if _, err := io.ReadFull(stdout, prompt); err != nil || string(prompt) != "qemu-io> " {
		t.Fatalf("qemu-io did not open the image: %q %v", prompt, err)
	}
	img, lerr := Open(p, Options{})
	if lerr == nil {
		img.Close()
	}
	if !errors.Is(lerr, ErrLocked) {
		t.Fatalf("open while qemu-io holds the image: %v, want ErrLocked", lerr)
	}
}
