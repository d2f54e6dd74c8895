package vmdk

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/imagetest"
)

// model applies the same operations to an image and to a byte slice.
type model struct {
	t    *testing.T
	img  image.Image
	want []byte
}

func (m *model) write(off int64, b []byte) {
	m.t.Helper()
	if _, err := m.img.WriteAt(b, off); err != nil {
		m.t.Fatalf("WriteAt(%d, %d): %v", off, len(b), err)
	}
	copy(m.want[off:], b)
}

func (m *model) discard(off, n int64) {
	m.t.Helper()
	if err := m.img.Discard(off, n); err != nil {
		m.t.Fatalf("Discard(%d, %d): %v", off, n, err)
	}
	clear(m.want[off : off+n])
}

// randomOps writes and discards at random, partial and whole grains.
func (m *model) randomOps(r *rand.Rand, n int) {
	size := int64(len(m.want))
	for range n {
		off := r.Int64N(size)
		l := min(r.Int64N(150<<10)+1, size-off)
		if r.IntN(8) == 0 {
			m.discard(off, l)
			continue
		}
		b := make([]byte, l)
		fill := byte(r.Uint32())
		for i := range b {
			b[i] = fill + byte(i>>9)
		}
		m.write(off, b)
	}
}

func (m *model) verify() {
	m.t.Helper()
	if got := readAll(m.t, m.img); !bytes.Equal(got, m.want) {
		m.t.Fatalf("image differs from model at %d", imagetest.FirstDiff(got, m.want))
	}
	checkMapCovers(m.t, m.img, m.want)
}

type qemuInfo struct {
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtual-size"`
	Backing     string `json:"backing-filename"`
}

func qinfo(t *testing.T, p string) qemuInfo {
	var qi qemuInfo
	if err := json.Unmarshal([]byte(run(t, "qemu-img", "info", "--output=json", p)), &qi); err != nil {
		t.Fatal(err)
	}
	return qi
}

// acceptByOracles: qemu-img info, qemu-img convert and vmdkinfo accept
// the image and see want; for sparse layouts (check) qemu-img check is
// clean and vmdkmount reads want too.
func acceptByOracles(t *testing.T, p string, want []byte, check bool) {
	t.Helper()
	qi := qinfo(t, p)
	if qi.Format != "vmdk" || qi.VirtualSize != int64(len(want)) {
		t.Fatalf("qemu-img info: %+v, want vmdk of %d", qi, len(want))
	}
	if check {
		out := run(t, "qemu-img", "check", "-f", "vmdk", p)
		if !strings.Contains(out, "No errors") {
			t.Fatalf("qemu-img check: %s", out)
		}
	}
	if got := toRaw(t, p, "vmdk"); !bytes.Equal(got, want) {
		t.Fatalf("qemu-img convert differs at %d", imagetest.FirstDiff(got, want))
	}
	out := run(t, "vmdkinfo", p)
	if !strings.Contains(out, fmt.Sprintf("(%d bytes)", len(want))) {
		t.Fatalf("vmdkinfo does not report %d bytes:\n%s", len(want), out)
	}
	// libvmdk 20200926 mounts sparse and stream layouts; for flat ones it
	// says "Unsupported disk type" (qemu's own included).
	if check {
		if got := vmdkMount(t, p); !bytes.Equal(got, want) {
			t.Fatalf("vmdkmount reads differently at %d", imagetest.FirstDiff(got, want))
		}
	}
}

// TestCreateWriteOracles: images we create and write are accepted and read
// identically by qemu-img, qemu-io and vmdkinfo.
func TestCreateWriteOracles(t *testing.T) {
	for _, tc := range []struct {
		name string
		co   CreateOptions
	}{
		{"sparse", CreateOptions{}},
		{"sparse-zeroed", CreateOptions{ZeroedGrain: true}},
		{"sparse-16k", CreateOptions{ClusterSize: 16 << 10}},
		{"flat", CreateOptions{Subformat: "monolithicFlat"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "d.vmdk")
			co := tc.co
			co.Size = 9<<20 + 512 // a ragged end; two grain tables at 16 KiB grains
			if err := Create(p, co); err != nil {
				t.Fatal(err)
			}
			if err := Create(p, co); err == nil {
				t.Fatal("Create overwrote an existing image")
			}
			acceptByOracles(t, p, make([]byte, co.Size), tc.co.Subformat == "")
			img, err := Open(p, Options{})
			if err != nil {
				t.Fatal(err)
			}
			m := &model{t: t, img: img, want: make([]byte, co.Size)}
			m.randomOps(rand.New(rand.NewPCG(1, 2)), 60)
			m.write(co.Size-1000, bytes.Repeat([]byte{0xee}, 1000))
			m.verify()
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			acceptByOracles(t, p, m.want, tc.co.Subformat == "")
			run(t, "qemu-io", "-f", "vmdk", "-r", "-c", "read -P 0xee "+itoa64(co.Size-1000)+" 1000", p)
			if tc.co.Subformat == "" {
				r, err := Check(p, CheckOptions{})
				if err != nil || r.Corruptions != 0 {
					t.Fatalf("Check: %v %+v", err, r)
				}
			}
		})
	}
}

// TestMixedWriters: qemu-io writes, we read; we write, qemu-io verifies;
// qemu-img check is clean after each step.
func TestMixedWriters(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "m.vmdk")
	if err := Create(p, CreateOptions{Size: 8 << 20}); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-io", "-f", "vmdk", "-c", "write -P 0x31 100000 200000", "-c", "write -P 0x32 5M 64k", p)
	run(t, "qemu-img", "check", "-f", "vmdk", p)
	img, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 8<<20)
	for i := 100000; i < 300000; i++ {
		want[i] = 0x31
	}
	for i := 5 << 20; i < 5<<20+64<<10; i++ {
		want[i] = 0x32
	}
	m := &model{t: t, img: img, want: want}
	m.verify()
	m.write(150000, bytes.Repeat([]byte{0x41}, 70000)) // into qemu's grains
	m.write(7<<20+3, bytes.Repeat([]byte{0x42}, 5000)) // a new grain
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "check", "-f", "vmdk", p)
	run(t, "qemu-io", "-f", "vmdk", "-r", "-c", "read -P 0x41 150000 70000", "-c", "read -P 0x31 220000 80000",
		"-c", "read -P 0x42 7340035 5000", "-c", "read -P 0 7340032 3", p)
	run(t, "qemu-io", "-f", "vmdk", "-c", "write -P 0x43 7M 4096", p)
	copy(want[7<<20:], bytes.Repeat([]byte{0x43}, 4096))
	img, err = Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	(&model{t: t, img: img, want: want}).verify()
}

// TestCreateChild: a child we create over a qemu parent; writes copy the
// rest of the grain from the parent; qemu reads the chain like we do.
func TestCreateChild(t *testing.T) {
	base, child := qemuParent(t, "3M")
	if err := Create(child, CreateOptions{Backing: "base.vmdk", BackingFormat: "vmdk"}); err != nil {
		t.Fatal(err)
	}
	qi := qinfo(t, child)
	if qi.VirtualSize != 3<<20 || qi.Backing != "base.vmdk" {
		t.Fatalf("qemu-img info: %+v", qi)
	}
	img, err := Open(child, Options{Backing: opener(filepath.Dir(base))})
	if err != nil {
		t.Fatal(err)
	}
	if pc, bc := img.Info().ParentCID, img.backing.(*Image).Info().CID; pc != bc {
		t.Fatalf("child's parentCID %08x, parent's CID %08x", pc, bc)
	}
	m := &model{t: t, img: img, want: bytes.Repeat([]byte{0xaa}, 3<<20)}
	m.write(70000, []byte("hello"))
	m.discard(1<<20, 64<<10) // no zeroed grains: falls back to writing zeros
	m.verify()
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "check", "-f", "vmdk", child)
	if got := toRaw(t, child, "vmdk"); !bytes.Equal(got, m.want) {
		t.Fatalf("qemu reads the chain differently at %d", imagetest.FirstDiff(got, m.want))
	}
	// Not vmdkmount: libvmdk 20200926 shows the parent's data even where
	// qemu's own child images have allocated grains.
}

// TestStreamOptimizedRoundTrip: WriteStreamOptimized output (directory in
// the footer) is read identically by qemu-img, vmdkinfo and us.
func TestStreamOptimizedRoundTrip(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	want := patternRaw(t, src, 5<<20+1536, 3)
	sp := filepath.Join(dir, "src.vmdk")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "vmdk", src, sp)
	in, err := Open(sp, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out := filepath.Join(dir, "so.vmdk")
	if err := WriteStreamOptimized(context.Background(), out, in); err != nil {
		t.Fatal(err)
	}
	if err := WriteStreamOptimized(context.Background(), out, in); err == nil {
		t.Fatal("overwrote")
	}
	acceptByOracles(t, out, want, true)
	openReading(t, out, want)
	if _, err := Open(out, Options{}); err == nil {
		t.Fatal("opened a stream writable")
	}
	if r, err := Check(out, CheckOptions{}); err != nil || r.Corruptions != 0 {
		t.Fatalf("Check: %v %+v", err, r)
	}
}

// TestConcurrentWriters: many goroutines writing partial grains at once,
// several into each grain, never double-allocate; the result is what the
// writes say and qemu-img check is clean.
func TestConcurrentWriters(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "c.vmdk")
	if err := Create(p, CreateOptions{Size: 4 << 20}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, Options{GTCache: 4})
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 4<<20)
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// writer w owns bytes whose 4 KiB block index is w mod 8
			b := bytes.Repeat([]byte{byte(w + 1)}, 4096)
			for blk := w; blk < len(want)/4096; blk += 8 {
				if _, err := img.WriteAt(b, int64(blk)*4096); err != nil {
					t.Error(err)
					return
				}
				rb := make([]byte, 4096)
				if _, err := img.ReadAt(rb, int64(blk)*4096); err != nil || !bytes.Equal(rb, b) {
					t.Errorf("read back block %d: %v", blk, err)
					return
				}
			}
		}()
	}
	for blk := range len(want) / 4096 {
		copy(want[blk*4096:], bytes.Repeat([]byte{byte(blk%8 + 1)}, 4096))
	}
	wg.Wait()
	(&model{t: t, img: img, want: want}).verify()
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	r, err := Check(p, CheckOptions{})
	if err != nil || r.Corruptions != 0 || r.Leaks != 0 || r.AllocatedGrains != 64 {
		t.Fatalf("Check: %v %+v", err, r)
	}
	run(t, "qemu-img", "check", "-f", "vmdk", p)
	if got := toRaw(t, p, "vmdk"); !bytes.Equal(got, want) {
		t.Fatalf("qemu differs at %d", imagetest.FirstDiff(got, want))
	}
}

// TestWriteQemuSubformats: images qemu-img made in every writable layout
// take our writes; qemu-img then reads what we wrote (and checks clean).
func TestWriteQemuSubformats(t *testing.T) {
	for _, sub := range []string{"monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"} {
		t.Run(sub, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "q.vmdk")
			const size = 6 << 20
			run(t, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat="+sub, p, "6M")
			img, err := Open(p, Options{})
			if err != nil {
				t.Fatal(err)
			}
			cid := img.Info().CID
			m := &model{t: t, img: img, want: make([]byte, size)}
			m.randomOps(rand.New(rand.NewPCG(5, 5)), 30)
			m.verify()
			if img.Info().CID == cid {
				t.Error("CID unchanged after a write")
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			if strings.Contains(sub, "Sparse") {
				run(t, "qemu-img", "check", "-f", "vmdk", p)
			}
			if got := toRaw(t, p, "vmdk"); !bytes.Equal(got, m.want) {
				t.Fatalf("qemu reads differently at %d", imagetest.FirstDiff(got, m.want))
			}
			img, err = Open(p, Options{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			m.img = img
			m.verify()
		})
	}
}

// TestMapFlatHoles: holes in a flat extent map as zero, written ranges as
// data (as qemu-img map reports them).
func TestMapFlatHoles(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f.vmdk")
	if err := Create(p, CreateOptions{Size: 8 << 20, Subformat: "monolithicFlat"}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if _, err := img.WriteAt(bytes.Repeat([]byte{1}, 64<<10), 1<<20); err != nil {
		t.Fatal(err)
	}
	ext, err := img.Map(0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	var data int64
	for _, x := range ext {
		if x.Kind == image.Data {
			data += x.Length
			if x.Offset > 1<<20 || x.Offset+x.Length < 1<<20+64<<10 {
				t.Fatalf("data extent %+v does not cover the write", x)
			}
		}
	}
	if data < 64<<10 || data > 1<<20 {
		t.Fatalf("data %d bytes: %+v", data, ext)
	}
	if err := img.Discard(1<<20, 64<<10); err != nil {
		t.Fatal(err)
	}
	if ext, _ = img.Map(0, img.Size()); len(ext) != 1 || ext[0].Kind != image.Zero {
		t.Fatalf("after discard: %+v", ext)
	}
}

// TestWriteWithoutTables: an image whose grain directory is empty (tables
// never preallocated) takes writes; the new tables are placed at the end
// and qemu, vmdkmount and our check accept the result.
func TestWriteWithoutTables(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "n.vmdk")
	run(t, "qemu-img", "create", "-q", "-f", "vmdk", p, "40M")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, dropTables(t, b), 0o644); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	m := &model{t: t, img: img, want: make([]byte, 40<<20)}
	m.randomOps(rand.New(rand.NewPCG(9, 9)), 40)
	m.verify()
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	acceptByOracles(t, p, m.want, true)
	r, err := Check(p, CheckOptions{})
	if err != nil || r.Corruptions != 0 || len(r.Warnings) != 0 {
		t.Fatalf("Check: %v %+v", err, r)
	}
}
