package qcow2

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/internal/parallel"
	"golang.org/x/sys/unix"
)

// qemuQcow2Info is what TestCreateAccepted reads of qemu-img info's JSON.
type qemuQcow2Info struct {
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtual-size"`
	ClusterSize int64  `json:"cluster-size"`
	Backing     string `json:"backing-filename"`
	BackingFmt  string `json:"backing-filename-format"`
	Specific    struct {
		Data struct {
			Compat        string `json:"compat"`
			RefcountBits  int    `json:"refcount-bits"`
			LazyRefcounts bool   `json:"lazy-refcounts"`
		} `json:"data"`
	} `json:"format-specific"`
}

// createDefaults: the cluster size, compat and refcount width an image
// created with c must have.
func createDefaults(c CreateOptions) (cs int64, compat string, refcountBits int) {
	cs, compat, refcountBits = c.ClusterSize, c.Compat, c.RefcountBits
	if cs == 0 {
		cs = 65536
	}
	if compat == "" {
		compat = "1.1"
	}
	if refcountBits == 0 {
		refcountBits = 16
	}
	return cs, compat, refcountBits
}

// Images we create are accepted by qemu-img info and check and by
// qcowinfo, with and without a backing file.
func TestCreateAccepted(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []CreateOptions{
		{Size: 10 << 20},
		{Size: 1<<30 + 512, ClusterSize: 512},
		{Size: 3 << 40, ClusterSize: 2 << 20},
		{Size: 5 << 20, Compat: "0.10", ClusterSize: 4096},
		{Size: 5 << 20, RefcountBits: 1},
		{Size: 5 << 20, RefcountBits: 64, LazyRefcounts: true},
		{Size: 5 << 20, Backing: "base.raw", BackingFormat: "raw"},
		{Size: 5 << 20, Backing: "base.raw", Compat: "0.10"},
		{Size: 1000},
	}
	for i, c := range cases {
		p := filepath.Join(dir, fmt.Sprintf("%d.qcow2", i))
		if err := Create(p, c); err != nil {
			t.Fatalf("%+v: %v", c, err)
		}
		if err := Create(p, c); err == nil || !errors.Is(err, os.ErrExist) {
			t.Fatalf("second create over %s: %v", p, err)
		}
		var info qemuQcow2Info
		out := run(t, "qemu-img", "info", "--output=json", p)
		if err := json.Unmarshal([]byte(out), &info); err != nil {
			t.Fatal(err)
		}
		wantCS, wantCompat, wantRB := createDefaults(c)
		if info.Format != "qcow2" || info.VirtualSize != (c.Size+511)&^511 || info.ClusterSize != wantCS ||
			info.Backing != c.Backing || info.BackingFmt != c.BackingFormat || info.Specific.Data.Compat != wantCompat ||
			info.Specific.Data.RefcountBits != wantRB || info.Specific.Data.LazyRefcounts != c.LazyRefcounts {
			t.Fatalf("%+v: qemu-img info %s", c, out)
		}
		requireQemuClean(t, p)
		if c.Backing == "" {
			out := run(t, "qcowinfo", p)
			if !strings.Contains(out, fmt.Sprintf("(%d bytes)", info.VirtualSize)) {
				t.Fatalf("qcowinfo: %s", out)
			}
		}
		img, err := Open(p, Options{Backing: openerFor(p)})
		if err != nil {
			t.Fatal(err)
		}
		if in := img.Info(); in.VirtualSize != info.VirtualSize || in.ClusterSize != wantCS || in.Compat != wantCompat {
			t.Fatalf("our info %+v", in)
		}
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if err := Create(filepath.Join(dir, "bad"), CreateOptions{Size: 1, ClusterSize: 1000}); err == nil {
		t.Fatal("cluster size 1000 accepted")
	}
}

// workload applies random writes and discards to img and to model.
func workload(t testing.TB, img *Image, model []byte, rng *rand.Rand, ops int) {
	t.Helper()
	cs := img.cs
	for i := 0; i < ops; i++ {
		size := int64(len(model))
		off := rng.Int64N(size)
		if rng.IntN(2) == 0 {
			off &^= 511
		}
		n := min(rng.Int64N(3*cs)+1, size-off)
		switch rng.IntN(10) {
		case 0:
			if err := img.Discard(off, n); err != nil {
				t.Fatalf("discard %d+%d: %v", off, n, err)
			}
			clear(model[off : off+n])
		case 1:
			if err := img.Flush(); err != nil {
				t.Fatal(err)
			}
		default:
			b := fill(rng, int(n))
			if _, err := img.WriteAt(b, off); err != nil {
				t.Fatalf("write %d+%d: %v", off, n, err)
			}
			copy(model[off:], b)
		}
	}
}

// Our writes read back identically through qemu-img convert and qemu-io,
// and qemu-img check finds nothing wrong, over every cluster size,
// version, refcount width, and with a backing file (copy on write).
func TestWriteReadBack(t *testing.T) {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(7, 8))
	baseData := fill(rng, 3<<20+1234)
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, baseData, 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		o    CreateOptions
		ops  int
	}{
		{"default", CreateOptions{Size: 8 << 20}, 60},
		{"cs512-grow-reftable", CreateOptions{Size: 12 << 20, ClusterSize: 512}, 40},
		{"cs2M", CreateOptions{Size: 9 << 20, ClusterSize: 2 << 20}, 12},
		{"v2", CreateOptions{Size: 4<<20 + 512, Compat: "0.10", ClusterSize: 4096}, 60},
		{"rb1", CreateOptions{Size: 4 << 20, ClusterSize: 4096, RefcountBits: 1}, 60},
		{"rb64", CreateOptions{Size: 4 << 20, ClusterSize: 4096, RefcountBits: 64}, 60},
		{"backing-raw", CreateOptions{Size: 4 << 20, ClusterSize: 4096, Backing: "base.raw", BackingFormat: "raw"}, 60},
		{"backing-v2", CreateOptions{Size: 4 << 20, ClusterSize: 65536, Backing: "base.raw", BackingFormat: "raw", Compat: "0.10"}, 60},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := filepath.Join(dir, c.name+".qcow2")
			img, err := CreateImage(p, c.o, Options{Backing: openerFor(p)})
			if err != nil {
				t.Fatal(err)
			}
			model := make([]byte, img.Size())
			if c.o.Backing != "" {
				copy(model, baseData)
			}
			if c.name == "cs512-grow-reftable" {
				// Sequential fill: 24k clusters, beyond what the first
				// refcount table cluster can count.
				b := fill(rng, 1<<20)
				for off := int64(0); off < img.Size(); off += int64(len(b)) {
					if _, err := img.WriteAt(b, off); err != nil {
						t.Fatal(err)
					}
					copy(model[off:], b)
				}
			}
			if c.name == "cs512-grow-reftable" && img.mu.refClus < 2 {
				t.Fatalf("refcount table did not grow: %d clusters", img.mu.refClus)
			}
			workload(t, img, model, rng, c.ops)
			// A known pattern for qemu-io to verify, across a cluster
			// boundary and into the middle of the next.
			pat := bytes.Repeat([]byte{0x5a}, int(img.cs)+1536)
			patOff := int64(len(model)/3) &^ 511
			if _, err := img.WriteAt(pat, patOff); err != nil {
				t.Fatal(err)
			}
			copy(model[patOff:], pat)
			sameBytes(t, "our read", readAll(t, img), model)
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			requireQemuClean(t, p)
			sameBytes(t, "qemu-img convert", qemuRaw(t, p), model)
			res, err := Check(p, CheckOptions{})
			if err != nil || !res.Clean() || res.Leaks != 0 {
				t.Fatalf("our check: %v %+v", err, res)
			}
			qemuIO(t, p, fmt.Sprintf("read -P 0x5a %d %d", patOff, len(pat)))
		})
	}
}

// Mixed writers: we write, qemu-io verifies; qemu-io writes, we verify;
// qemu-img check is clean after every step.
func TestMixedWriters(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "m.qcow2")
	if err := Create(p, CreateOptions{Size: 4 << 20, ClusterSize: 4096}); err != nil {
		t.Fatal(err)
	}
	for round := 0; round < 3; round++ {
		img, err := Open(p, Options{})
		if err != nil {
			t.Fatal(err)
		}
		pat := byte(0x10 + round)
		b := make([]byte, 70000)
		for i := range b {
			b[i] = pat
		}
		off := int64(round)*300000 + 1024
		if _, err := img.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
		requireQemuClean(t, p)
		qemuIO(t, p, fmt.Sprintf("read -P %d %d %d", pat, off, len(b)))
		qpat := 0x80 + round
		qoff := int64(round)*300000 + 200000
		qemuIO(t, p, fmt.Sprintf("write -P %d %d 33333", qpat, qoff), fmt.Sprintf("write -z %d 8192", qoff+65536))
		requireQemuClean(t, p)
		img, err = Open(p, Options{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 33333)
		if _, err := img.ReadAt(got, qoff); err != nil {
			t.Fatal(err)
		}
		for i, c := range got {
			if c != byte(qpat) {
				t.Fatalf("round %d: byte %d is %#x", round, i, c)
			}
		}
		// Our earlier write survives qemu's.
		if _, err := img.ReadAt(got[:100], off); err != nil || got[0] != pat {
			t.Fatalf("round %d: our data lost: %v %#x", round, err, got[0])
		}
		img.Close()
	}
}

// Many goroutines writing the same clusters: no double allocation, no
// lost write, refcounts exact.
func TestConcurrentWriters(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "c.qcow2")
	img, err := CreateImage(p, CreateOptions{Size: 1 << 20, ClusterSize: 4096}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	const workers = 8
	parallel.Run(t, workers, func(w int) error {
		// Worker w owns sector w of every cluster: all workers race to
		// allocate each cluster.
		b := make([]byte, 512)
		for i := range b {
			b[i] = byte(w + 1)
		}
		for c := int64(0); c < 256; c++ {
			if _, err := img.WriteAt(b, c*4096+int64(w)*512); err != nil {
				return err
			}
			if c%64 == 0 {
				buf := make([]byte, 4096)
				if _, err := img.ReadAt(buf, c*4096); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	requireQemuClean(t, p)
	raw := qemuRaw(t, p)
	for c := 0; c < 256; c++ {
		for w := 0; w < workers; w++ {
			if got := raw[c*4096+w*512]; got != byte(w+1) {
				t.Fatalf("cluster %d sector %d: %#x", c, w, got)
			}
		}
	}
}

// Lazy refcounts: the dirty bit is set while writing and cleared on a
// clean close; an image left dirty is repaired when opened for writing.
func TestLazyRefcountsAndDirty(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "l.qcow2")
	img, err := CreateImage(p, CreateOptions{Size: 2 << 20, ClusterSize: 4096, LazyRefcounts: true}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if img.Info().Dirty {
		t.Fatal("dirty before any write")
	}
	if _, err := img.WriteAt(make([]byte, 10000), 5000); err != nil {
		t.Fatal(err)
	}
	if !img.Info().Dirty {
		t.Fatal("not dirty after a write")
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	requireQemuClean(t, p)
	if img, err = Open(p, Options{ReadOnly: true}); err != nil || img.Info().Dirty {
		t.Fatalf("dirty after clean close: %v", err)
	}
	img.Close()

	// Crash: write, then drop the image without Close (the process dies).
	img, err = Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt([]byte("hello"), 1<<20); err != nil {
		t.Fatal(err)
	}
	img.f.Close()
	img, err = Open(p, Options{ReadOnly: true})
	if err != nil || !img.Info().Dirty {
		t.Fatalf("not dirty after a crash: %v", err)
	}
	img.Close()
	img, err = Open(p, Options{}) // repairs
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	requireQemuClean(t, p)
	qemuIO(t, p, "read -P 0x68 1048576 1")
}

// Read-only images refuse writes and discards with ErrReadOnly; requests
// past the end fail with ErrOutOfRange; calls after Close with ErrClosed.
func TestErrorsClasses(t *testing.T) {
	p := filepath.Join(t.TempDir(), "e.qcow2")
	if err := Create(p, CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	img, err := Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt([]byte{1}, 0); !errors.Is(err, image.ErrReadOnly) {
		t.Fatal(err)
	}
	if err := img.Discard(0, 512); !errors.Is(err, image.ErrReadOnly) {
		t.Fatal(err)
	}
	if _, err := img.ReadAt(make([]byte, 2), 1<<20-1); !errors.Is(err, image.ErrOutOfRange) {
		t.Fatal(err)
	}
	img.Close()
	if _, err := img.ReadAt(make([]byte, 2), 0); !errors.Is(err, image.ErrClosed) {
		t.Fatal(err)
	}
	if _, err := Open(filepath.Join(t.TempDir(), "none"), Options{}); !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
}

// Compressed writes (for image convert -c) read back through qemu-img,
// count as compressed in both checks, and save disk blocks.
func TestWriteCompressed(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []CreateOptions{
		{Size: 3<<20 + 4096, ClusterSize: 65536},
		{Size: 1 << 20, ClusterSize: 4096, Compat: "0.10"},
		{Size: 256 << 10, ClusterSize: 512},
		{Size: 3<<20 + 4096, ClusterSize: 65536, CompressionType: "zstd"},
		{Size: 1 << 20, ClusterSize: 4096, CompressionType: "zstd"},
		{Size: 6 << 20, ClusterSize: 2 << 20, CompressionType: "zstd"},
		// 1-bit refcounts: no host cluster can be shared, so no packing.
		{Size: 1 << 20, ClusterSize: 4096, RefcountBits: 1},
	} {
		p := filepath.Join(dir, fmt.Sprintf("z%d%s-r%d.qcow2", c.ClusterSize, c.CompressionType, c.RefcountBits))
		img, err := CreateImage(p, c, Options{Scratch: true})
		if err != nil {
			t.Fatal(err)
		}
		model := make([]byte, img.Size())
		rng := rand.New(rand.NewPCG(4, 4))
		// Text, and random 5000-byte runs each repeated once 5000 bytes
		// on, past the 4 KiB window (TestDeflateWindow checks the window;
		// qemu inflates a whole cluster at once, so it reads either way).
		for i := range model {
			model[i] = "compressible text, mostly "[i%26]
		}
		for i := 0; i+20000 <= len(model); i += 20000 {
			r := fill(rng, 5000)
			copy(model[i:], r)
			copy(model[i+5000:], r)
		}
		copy(model[img.cs:], fill(rng, int(img.cs))) // one incompressible cluster
		if err := img.WriteCompressed(model, 0); err != nil {
			t.Fatal(err)
		}
		if err := img.WriteCompressed(model[:10], 3); err == nil {
			t.Fatal("unaligned compressed write accepted")
		}
		// Overwrite part of a compressed cluster: copy on write.
		b := fill(rng, 700)
		off := 2*img.cs + 100
		if _, err := img.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], b)
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
		requireQemuClean(t, p)
		sameBytes(t, p, qemuRaw(t, p), model)
		if want := c.CompressionType; want != "" && !strings.Contains(run(t, "qemu-img", "info", p), "compression type: "+want) {
			t.Fatalf("%s: qemu-img info does not say compression type %s", p, want)
		}
		back, err := Open(p, Options{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		sameBytes(t, p+" read back", readAll(t, back), model)
		back.Close()
		res, err := Check(p, CheckOptions{})
		if err != nil || !res.Clean() || (c.ClusterSize > 512 && res.CompressedClusters < res.TotalClusters/2) {
			t.Fatalf("check: %v %+v", err, res)
		}
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil {
			t.Fatal(err)
		}
		// Half the model is random and stays as it is; the text half
		// shrinks to little, and packed clusters leave no holes to hide
		// in, so the file itself is that small.
		if c.ClusterSize >= 4096 && c.ClusterSize <= 65536 && c.RefcountBits != 1 && (st.Size > int64(len(model))*3/4 || st.Blocks*512 > int64(len(model))*3/4) {
			t.Fatalf("compressed image of %d bytes: file %d, disk %d", len(model), st.Size, st.Blocks*512)
		}
	}
}

// Concurrent writes, reads, discards, flushes and maps on disjoint regions
// (each goroutine keeps its own model), over a backing file and after a
// snapshot so copy-on-write and deferred frees run concurrently.
func TestConcurrentMixedOps(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, bytes.Repeat([]byte{0x33}, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "cm.qcow2")
	if err := Create(p, CreateOptions{Size: 1 << 20, ClusterSize: 4096, Backing: "base.raw", BackingFormat: "raw"}); err != nil {
		t.Fatal(err)
	}
	qemuIO(t, p, "write -P 0x44 0 512k")
	run(t, "qemu-img", "snapshot", "-c", "s", p)
	want := qemuRaw(t, p)
	img, err := Open(p, Options{Backing: openerFor(p)})
	if err != nil {
		t.Fatal(err)
	}
	const workers = 4
	region := int64(1<<20) / workers
	parallel.Run(t, workers, func(w int) error {
		rng := rand.New(rand.NewPCG(uint64(w), 77))
		lo := int64(w) * region
		model := want[lo : lo+region]
		for i := 0; i < 150; i++ {
			off := rng.Int64N(region - 1)
			n := min(rng.Int64N(9000)+1, region-off)
			var err error
			switch rng.IntN(8) {
			case 0:
				err = img.Discard(lo+off, n)
				clear(model[off : off+n])
			case 1:
				err = img.Flush()
			case 2:
				_, err = img.Map(lo, region)
			case 3:
				got := make([]byte, n)
				if _, err = img.ReadAt(got, lo+off); err == nil && !bytes.Equal(got, model[off:off+n]) {
					err = fmt.Errorf("worker %d: read %d+%d differs", w, lo+off, n)
				}
			default:
				b := fill(rng, int(n))
				_, err = img.WriteAt(b, lo+off)
				copy(model[off:], b)
			}
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	requireQemuClean(t, p)
	sameBytes(t, "after concurrent ops", qemuRaw(t, p), want)
}
