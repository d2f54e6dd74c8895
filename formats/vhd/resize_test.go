package vhd

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/crashfs"
	"github.com/blktap-go/blktap/internal/oracle"
)

// A power cut at every operation of a resize, each unsynced write then
// kept or lost by a coin: the disk opens, checks clean, and is the old
// disk whole or the new one (old data up to the smaller size, zeros past
// it). qemu-io and vhdiinfo read the finished resize at its new size.
func TestResizeCrash(t *testing.T) {
	const kib = 1 << 10
	cases := []struct {
		name     string
		sub      string
		old, new int64
	}{
		{"fixed-grow", "fixed", 768 * kib, 2048*kib + 512},
		{"fixed-shrink", "fixed", 768 * kib, 300 * kib},
		{"dynamic-grow", "dynamic", 300 * kib, 512 * kib}, // within the BAT's two blocks
		// 160 blocks: a new BAT of two sectors and batmap where block 0 was.
		{"dynamic-grow-past-bat", "dynamic", 300 * kib, 40 << 20},
		{"dynamic-shrink", "dynamic", 1000 * kib, 512 * kib},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			// 256 KiB blocks, data in the first 256 KiB only: a shrink to
			// 300 or 512 KiB drops no block.
			data := make([]byte, 256*kib)
			pattern(data, 7)
			// Three cuts at each operation: two random draws of the
			// unsynced writes, and the newest alone.
			for step := 3; ; step++ {
				n, coin := step/3, step%3
				f, img := memImage(t, CreateOptions{Size: c.old, BlockSize: 256 * kib, Subformat: c.sub}, nil)
				if _, err := img.WriteAt(data, 0); err != nil {
					t.Fatal(err)
				}
				if err := img.Flush(); err != nil {
					t.Fatal(err)
				}
				f.FS().Schedule(n, crashfs.Writes|crashfs.Truncates|crashfs.Punches|crashfs.Syncs)
				err := img.Resize(c.new)
				if err == nil {
					checkResized(t, f.Bytes(), c.new, data)
					t.Logf("power cut at each of %d operations", n-1)
					return
				}
				if !errors.Is(err, crashfs.ErrCrashed) {
					t.Fatalf("op %d: %v", n, err)
				}
				var kept []byte
				if coin == 1 {
					for _, b := range f.FS().CrashNewestOnly() {
						kept = b
					}
				} else {
					r := rand.New(rand.NewSource(int64(step)))
					kept = f.Crash(func() bool { return r.Intn(2) == 0 })
				}
				cf := newCrashFile(kept)
				// Writable: a dynamic disk's footer copy left behind the
				// footer at the end is rewritten by the open.
				img2, err := openFile(cf, "crashed.vhd", Options{Logger: discardLogger()})
				if err != nil {
					t.Fatalf("op %d: reopen: %v", n, err)
				}
				if img2.Size() != c.old && img2.Size() != c.new {
					t.Fatalf("op %d: size %d, neither %d nor %d", n, img2.Size(), c.old, c.new)
				}
				if res, err := checkFile(cf, "crashed.vhd", CheckOptions{}); err != nil || !res.OK() {
					t.Fatalf("op %d: check: %v %+v", n, err, res)
				}
				want := make([]byte, img2.Size())
				copy(want, data)
				got := readAll(t, img2)
				// A fixed disk's footer moves: cut between writing the new
				// one and clearing (grow) or cutting off (shrink) the old,
				// the sector at the smaller size may hold a footer.
				if m := min(c.old, c.new); c.sub == "fixed" && m < img2.Size() && bytes.HasPrefix(got[m:], []byte(cookieFooter)) {
					copy(got[m:m+footerSize], want[m:])
				}
				mustEqual(t, fmt.Sprintf("op %d", n), got, want)
				if n > 50 {
					t.Fatal("resize never finished")
				}
			}
		})
	}
}

// checkResized: our check, qemu-io (data, then zeros) and vhdiinfo (the
// size) on a finished resize.
func checkResized(t *testing.T, b []byte, size int64, data []byte) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "resized.vhd")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if res, err := Check(p, CheckOptions{}); err != nil || !res.OK() {
		t.Fatalf("check: %v %+v", err, res)
	}
	want := make([]byte, size)
	copy(want, data)
	mustEqual(t, "qemu-img convert", qemuRaw(t, p), want)
	out, err := exec.Command(oracle.Require(t, "vhdiinfo"), p).CombinedOutput()
	if err != nil {
		t.Fatalf("vhdiinfo: %v\n%s", err, out)
	}
	// libvhdi reports the original size, which a resize sets too.
	if !strings.Contains(string(out), fmt.Sprintf("(%d bytes)", size)) {
		t.Fatalf("vhdiinfo does not read %d bytes:\n%s", size, out)
	}
}

// Refused: a differencing disk, a shrink past an allocated block, a size
// that is not whole sectors.
func TestResizeRefused(t *testing.T) {
	_, dyn := memImage(t, CreateOptions{Size: 1 << 20, BlockSize: 256 << 10}, nil)
	if _, err := dyn.WriteAt(make([]byte, 512), 900<<10); err != nil {
		t.Fatal(err)
	}
	for _, size := range []int64{512 << 10, 1000, 0} {
		if err := dyn.Resize(size); err == nil {
			t.Fatalf("resize of a dynamic 1 MiB disk to %d accepted", size)
		}
	}
	_, child := memChild(t, dyn, CreateOptions{Size: 1 << 20, BlockSize: 256 << 10})
	if err := child.Resize(2 << 20); !errors.Is(err, image.ErrUnsupported) {
		t.Fatalf("differencing: %v, want ErrUnsupported", err)
	}
}
