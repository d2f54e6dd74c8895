package qcow2

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/imagetest"
)

// qemuIO runs qemu-io commands against an image.
func qemuIO(t testing.TB, path string, cmds ...string) string {
	t.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, path)
	out := run(t, "qemu-io", args...)
	if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "failed:") {
		t.Fatalf("qemu-io %v: %s", cmds, out)
	}
	return out
}

// qemuWorkload writes a mix of patterns, zero writes and discards that
// touches partial clusters and cluster boundaries.
func qemuWorkload(t testing.TB, path string, size, cs int64) {
	t.Helper()
	rng := rand.New(rand.NewPCG(uint64(size), uint64(cs)))
	var cmds []string
	for i := 0; i < 12; i++ {
		off := rng.Int64N(size/512) * 512
		n := min(int64(1+rng.IntN(3))*cs/2+512*int64(rng.IntN(8)), size-off)
		if n <= 0 {
			continue
		}
		cmds = append(cmds, fmt.Sprintf("write -P %d %d %d", 1+i, off, n))
	}
	// Zero clusters (v3) or zero-filled data (v2), and discards.
	cmds = append(cmds, fmt.Sprintf("write -z %d %d", 2*cs, 2*cs))
	cmds = append(cmds, fmt.Sprintf("write -P 77 %d %d", size-3*cs, 3*cs))
	cmds = append(cmds, fmt.Sprintf("discard %d %d", size-2*cs, cs))
	qemuIO(t, path, cmds...)
}

// Every layout qemu-img makes (compat 0.10 and 1.1, clusters 512 B to
// 2 MiB, refcount widths) reads identically through our code.
func TestReadQemuLayouts(t *testing.T) {
	dir := t.TempDir()
	for _, compat := range []string{"0.10", "1.1"} {
		for _, cs := range []int64{512, 4096, 65536, 2 << 20} {
			rbits := []int{16}
			if compat == "1.1" && cs == 4096 {
				rbits = []int{1, 8, 64}
			}
			for _, rb := range rbits {
				name := fmt.Sprintf("c%s-cs%d-rb%d", compat, cs, rb)
				t.Run(name, func(t *testing.T) {
					p := filepath.Join(dir, name+".qcow2")
					size := max(min(16*cs, 8<<20), 4<<20)
					opts := fmt.Sprintf("compat=%s,cluster_size=%d", compat, cs)
					if compat == "1.1" {
						opts += fmt.Sprintf(",refcount_bits=%d", rb)
					}
					run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, p, fmt.Sprint(size))
					qemuWorkload(t, p, size, cs)
					want := qemuRaw(t, p)
					img, err := Open(p, Options{ReadOnly: true})
					if err != nil {
						t.Fatal(err)
					}
					defer img.Close()
					sameBytes(t, "read", readAll(t, img), want)
					in := img.Info()
					if in.ClusterSize != cs || in.Compat != compat || in.RefcountBits != rb || in.VirtualSize != size {
						t.Fatalf("info %+v", in)
					}
					// Our check agrees with qemu-img check (clean).
					res, err := Check(p, CheckOptions{})
					if err != nil || !res.Clean() || res.Leaks != 0 {
						t.Fatalf("check: %v %+v", err, res)
					}
					compareMap(t, img, p)
				})
			}
		}
	}
}

// Preallocated and lazy-refcount layouts from qemu-img read identically
// and take our writes.
func TestQemuPreallocLayouts(t *testing.T) {
	dir := t.TempDir()
	for _, o := range []string{"preallocation=metadata", "preallocation=falloc,compat=0.10", "preallocation=full,cluster_size=4096", "lazy_refcounts=on"} {
		p := filepath.Join(dir, strings.NewReplacer("=", "-", ",", "-").Replace(o)+".qcow2")
		run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", o, p, "3M")
		qemuWorkload(t, p, 3<<20, 65536)
		want := qemuRaw(t, p)
		img, err := Open(p, Options{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		sameBytes(t, o, readAll(t, img), want)
		compareMap(t, img, p)
		img.Close()
		if img, err = Open(p, Options{}); err != nil {
			t.Fatal(err)
		}
		rng := rand.New(rand.NewPCG(9, 9))
		workload(t, img, want, rng, 30)
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
		requireQemuClean(t, p)
		sameBytes(t, o+" after our writes", qemuRaw(t, p), want)
	}
}

// compareMap checks our Map against qemu-img map: the same ranges are
// data, and where qemu says zero we say zero or hole.
func compareMap(t *testing.T, img *Image, path string) {
	t.Helper()
	ext := imagetest.MapAll(t, img)
	out := run(t, "qemu-img", "map", "-f", "qcow2", "--output=json", path)
	kindAt := func(off int64) image.ExtentKind {
		for _, x := range ext {
			if off >= x.Offset && off < x.Offset+x.Length {
				return x.Kind
			}
		}
		return 255
	}
	for _, line := range strings.Split(out, "\n") {
		var start, length int64
		var depth int
		var zero, data string
		// {"start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, ...
		line = strings.NewReplacer("[", "", "]", "", ",", " ", "{", "", "}", "", "\"", "", ":", "").Replace(line)
		if strings.TrimSpace(line) == "" {
			continue
		}
		if _, err := fmt.Sscanf(line, "start %d length %d depth %d present %s zero %s data %s", &start, &length, &depth, new(string), &zero, &data); err != nil {
			// Newer fields in other positions: skip lines we cannot parse.
			continue
		}
		k := kindAt(start)
		switch {
		case data == "true" && zero == "true":
			if k != image.Data && k != image.Zero {
				t.Fatalf("qemu-img map says allocated zeros at %d, we say %v", start, k)
			}
		case data == "true" && k != image.Data:
			t.Fatalf("qemu-img map says data at %d, we say %v", start, k)
		case data == "false" && k == image.Data:
			t.Fatalf("qemu-img map says no data at %d, we say %v", start, k)
		}
	}
}

// Compressed clusters from `qemu-img convert -c` read identically.
func TestReadCompressed(t *testing.T) {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(1, 2))
	raw := make([]byte, 3<<20)
	for i := 0; i < len(raw); i += 4096 {
		// Compressible text-like data, some random runs, some zeros.
		switch (i / 4096) % 4 {
		case 0:
			copy(raw[i:], strings.Repeat(fmt.Sprintf("block %d ", i), 512))
		case 1:
			copy(raw[i:], fill(rng, 4096))
		case 2:
			copy(raw[i:], strings.Repeat("x", 1000))
		}
	}
	rp := filepath.Join(dir, "in.raw")
	if err := os.WriteFile(rp, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, cs := range []int64{512, 4096, 65536, 2 << 20} {
		for _, compat := range []string{"0.10", "1.1", "1.1,compression_type=zstd"} {
			p := filepath.Join(dir, fmt.Sprintf("c%d-%s.qcow2", cs, compat))
			run(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
				fmt.Sprintf("cluster_size=%d,compat=%s", cs, compat), rp, p)
			img, err := Open(p, Options{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			sameBytes(t, p, readAll(t, img), raw)
			img.Close()
		}
	}
	// Writing over compressed clusters: copy-on-write, refcounts exact.
	p := filepath.Join(dir, "c65536-1.1.qcow2")
	img, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	want := append([]byte(nil), raw...)
	for _, off := range []int64{100, 70000, 1 << 20, 3<<20 - 5000} {
		b := fill(rng, 3000)
		copy(want[off:], b)
		if _, err := img.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := img.Discard(2<<20, 128<<10); err != nil {
		t.Fatal(err)
	}
	clear(want[2<<20 : 2<<20+128<<10])
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	requireQemuClean(t, p)
	sameBytes(t, "after writes over compressed clusters", qemuRaw(t, p), want)
}

// Extended L2 entries, external data files and encryption are refused by
// name at open.
func TestRefuseExtendedL2AndFriends(t *testing.T) {
	dir := t.TempDir()
	cases := []struct{ opts, want string }{
		{"extended_l2=on,cluster_size=65536", "extended L2"},
		{"data_file=" + filepath.Join(dir, "ext.data"), "external data file"},
		{"encrypt.format=aes,encrypt.key-secret=sec0", "encryption"},
	}
	for i, c := range cases {
		p := filepath.Join(dir, fmt.Sprintf("%d.qcow2", i))
		args := []string{"create", "-q", "-f", "qcow2", "-o", c.opts, p, "1M"}
		if strings.Contains(c.opts, "encrypt") {
			args = append([]string{"create", "--object", "secret,id=sec0,data=pw"}, args[1:]...)
		}
		run(t, "qemu-img", args...)
		_, err := Open(p, Options{ReadOnly: true})
		if !errors.Is(err, image.ErrUnsupported) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want ErrUnsupported naming %q", c.opts, err, c.want)
		}
		var fe *image.FormatError
		if !errors.As(err, &fe) {
			t.Errorf("%s: %T is not a FormatError", c.opts, err)
		}
	}
}

// Backing chains made by qemu-img (qcow2 over qcow2 over raw) read
// identically, and Map reports depths.
func TestReadQemuBackingChain(t *testing.T) {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(3, 4))
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, fill(rng, 5<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	mid := filepath.Join(dir, "mid.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, "6M")
	qemuIO(t, mid, "write -P 1 65536 100000", "write -z 1048576 65536")
	// top has no backing format: the opener probes.
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", "-b", "mid.qcow2", "-F", "qcow2", top, "7M")
	qemuIO(t, top, "write -P 2 90000 5000", "write -P 3 6000000 100000")
	want := qemuRaw(t, top)
	img, err := Open(top, Options{ReadOnly: true, Backing: openerFor(top)})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if n, f := img.BackingFile(); n != "mid.qcow2" || f != "qcow2" {
		t.Fatalf("backing %q %q", n, f)
	}
	sameBytes(t, "chain", readAll(t, img), want)
	ext, err := img.Map(0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	depths := map[int]bool{}
	for _, x := range ext {
		depths[x.Depth] = true
		if x.Depth == 2 && x.Offset < 5<<20 && x.Kind != image.Data {
			t.Fatalf("raw base extent %+v", x)
		}
	}
	if !depths[0] || !depths[1] || !depths[2] {
		t.Fatalf("depths %v in %+v", depths, ext)
	}
	// Without an opener the image refuses to open, naming the need.
	if _, err := Open(top, Options{ReadOnly: true}); err == nil || !strings.Contains(err.Error(), "backing") {
		t.Fatalf("open without opener: %v", err)
	}
}

// Internal snapshots are listed; writes after a snapshot copy on write and
// leave the snapshot's data intact.
func TestSnapshots(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "s.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", p, "2M")
	qemuIO(t, p, "write -P 5 0 1M")
	run(t, "qemu-img", "snapshot", "-c", "first", p)
	qemuIO(t, p, "write -P 6 4096 8192")
	run(t, "qemu-img", "snapshot", "-c", "second", p)
	want := qemuRaw(t, p)
	img, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	in := img.Info()
	if len(in.Snapshots) != 2 || in.Snapshots[0].Name != "first" || in.Snapshots[1].Name != "second" || in.Snapshots[0].DiskSize != 2<<20 {
		t.Fatalf("snapshots %+v", in.Snapshots)
	}
	rng := rand.New(rand.NewPCG(5, 6))
	for i := 0; i < 40; i++ {
		off := rng.Int64N(2<<20 - 9000)
		b := fill(rng, 1+rng.IntN(9000))
		copy(want[off:], b)
		if _, err := img.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := img.Discard(1<<20, 64<<10); err != nil {
		t.Fatal(err)
	}
	clear(want[1<<20 : 1<<20+64<<10])
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	requireQemuClean(t, p)
	sameBytes(t, "active", qemuRaw(t, p), want)
	snap := qemuRaw(t, p, "-l", "first")
	for i := 0; i < 1<<20; i++ {
		if snap[i] != 5 {
			t.Fatalf("snapshot first changed at %d", i)
		}
	}
}
