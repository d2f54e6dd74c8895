package qcow

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/imagetest"
	"github.com/blktap-go/blktap/internal/oracle"
)

func run(t *testing.T, prog string, args ...string) string {
	t.Helper()
	return oracle.Run(t, prog, args...)
}

// testOpener opens backing files the way a caller must: relative names
// against the image's directory; qcow files recursively, anything else as
// raw (read whole: test files are small).
func testOpener(dir string) image.OpenFunc {
	return func(name, format string) (image.Image, error) {
		p := name
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		if Detect(b) {
			return Open(p, Options{ReadOnly: true, Backing: testOpener(filepath.Dir(p))})
		}
		return &memImage{data: b}, nil
	}
}

// qemuRaw is the image's content as qemu sees it.
func qemuRaw(t *testing.T, qemuImg, path string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out.raw")
	run(t, qemuImg, "convert", "-O", "raw", path, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func readAll(t *testing.T, path string) []byte {
	t.Helper()
	img, err := Open(path, Options{ReadOnly: true, Backing: testOpener(filepath.Dir(path))})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	b := make([]byte, img.Size())
	if _, err := img.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func writeRandomFile(t *testing.T, path string, size int, seed uint64) []byte {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 3))
	b := randBytes(rng, size)
	// Zero stretches, so sparse paths get exercised.
	for i := 0; i+100000 < size; i += 300000 {
		clear(b[i : i+100000])
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestQemuImagesReadIdentically: every qcow layout qemu-img makes reads the
// same through our code as through `qemu-img convert -O raw`.
func TestQemuImagesReadIdentically(t *testing.T) {
	qi := oracle.Require(t, "qemu-img")
	qio := oracle.Require(t, "qemu-io")
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	writeRandomFile(t, p("base.raw"), 3<<20+512, 1)

	cases := []struct {
		name  string
		setup [][]string // commands; "qemu-img"/"qemu-io" resolved below
	}{
		{"plain.qcow", [][]string{
			{"qemu-img", "create", "-f", "qcow", p("plain.qcow"), "8M"},
			{"qemu-io", "-f", "qcow", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 1M 4k",
				"-c", "write -P 0x33 5000 3000", "-c", "write -P 0x44 8380416 8192", p("plain.qcow")},
		}},
		{"odd-size.qcow", [][]string{
			{"qemu-img", "create", "-f", "qcow", p("odd-size.qcow"), "5243392"},
			{"qemu-io", "-f", "qcow", "-c", "write -P 0x55 5238784 4608", p("odd-size.qcow")},
		}},
		{"zeroes.qcow", [][]string{
			{"qemu-img", "create", "-f", "qcow", p("zeroes.qcow"), "4M"},
			{"qemu-io", "-f", "qcow", "-c", "write -P 0x66 0 1M", "-c", "write -z 4096 64k", p("zeroes.qcow")},
		}},
		{"converted.qcow", [][]string{
			{"qemu-img", "convert", "-f", "raw", "-O", "qcow", p("base.raw"), p("converted.qcow")},
		}},
		{"compressed.qcow", [][]string{
			// qemu-img 7.2 exits 1 after writing every cluster (its final
			// zero-length compressed write is refused by the qcow driver);
			// the compare with qemu's own reading below proves the content.
			{"-qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow", p("base.raw"), p("compressed.qcow")},
		}},
		{"over-raw.qcow", [][]string{
			{"qemu-img", "create", "-f", "qcow", "-b", "base.raw", "-F", "raw", p("over-raw.qcow")},
			{"qemu-io", "-f", "qcow", "-c", "write -P 0x77 700 1000", "-c", "write -P 0x78 2M 100k", p("over-raw.qcow")},
		}},
		{"over-raw-bigger.qcow", [][]string{
			{"qemu-img", "create", "-f", "qcow", "-b", "base.raw", "-F", "raw", p("over-raw-bigger.qcow"), "6M"},
			{"qemu-io", "-f", "qcow", "-c", "write -P 0x79 5M 4k", p("over-raw-bigger.qcow")},
		}},
		{"over-qcow.qcow", [][]string{
			{"qemu-img", "create", "-f", "qcow", "-b", "compressed.qcow", "-F", "qcow", p("over-qcow.qcow")},
			{"qemu-io", "-f", "qcow", "-c", "write -P 0x7a 1000 70000", p("over-qcow.qcow")},
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) { qemuImageReadsSame(t, qi, qio, dir, c.name, c.setup) })
	}
	compressedWrite(t, qi, dir)
}

// qemuImageReadsSame makes image name in dir with the setup commands and
// compares what we read, check and map with qemu's view of it.
func qemuImageReadsSame(t *testing.T, qi, qio, dir, name string, setup [][]string) {
	p := func(n string) string { return filepath.Join(dir, n) }
	for _, cmd := range setup {
		if cmd[0] == "-qemu-img" {
			exec.Command(qi, cmd[1:]...).Run()
			continue
		}
		prog := map[string]string{"qemu-img": qi, "qemu-io": qio}[cmd[0]]
		run(t, prog, cmd[1:]...)
	}
	want := qemuRaw(t, qi, p(name))
	if strings.HasPrefix(name, "compressed") {
		src, _ := os.ReadFile(p("base.raw"))
		if i := imagetest.FirstDiff(want, src); i >= 0 {
			t.Fatalf("qemu's compressed image differs from its source at %d", i)
		}
	}
	got := readAll(t, p(name))
	if i := imagetest.FirstDiff(got, want); i >= 0 {
		t.Fatalf("differs from qemu at byte %d (sizes %d, %d)", i, len(got), len(want))
	}
	res, err := Check(p(name), CheckOptions{})
	if err != nil || !res.OK() || res.LeakedClusters != 0 {
		t.Fatalf("check: %v %+v", err, res)
	}
	compareTopLayerMap(t, qi, p(name))
}

// compressedWrite: the compressed image really holds compressed clusters,
// and writing into them, partial writes keep the rest.
func compressedWrite(t *testing.T, qi, dir string) {
	p := func(n string) string { return filepath.Join(dir, n) }
	res, err := Check(p("compressed.qcow"), CheckOptions{})
	if err != nil || res.CompressedClusters == 0 {
		t.Fatalf("compressed image: %v %+v", err, res)
	}
	// Writing into compressed clusters: partial writes keep the rest.
	img, err := Open(p("compressed.qcow"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(bytes.Repeat([]byte{0xC3}, 100), 10000); err != nil {
		t.Fatal(err)
	}
	img.Close()
	want, _ := os.ReadFile(p("base.raw"))
	copy(want[10000:], bytes.Repeat([]byte{0xC3}, 100))
	if i := imagetest.FirstDiff(qemuRaw(t, qi, p("compressed.qcow")), want); i >= 0 {
		t.Fatalf("qemu sees our write into a compressed cluster wrong at %d", i)
	}
}

// TestOurImagesAcceptedByQemu: images we create and write are accepted by
// qemu-img info and qcowinfo and read back identically by qemu.
func TestOurImagesAcceptedByQemu(t *testing.T) {
	qi := oracle.Require(t, "qemu-img")
	qio := oracle.Require(t, "qemu-io")
	qinfo := oracle.Require(t, "qcowinfo")
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	base := writeRandomFile(t, p("base.raw"), 2<<20, 2)

	cases := []struct {
		name string
		opts CreateOptions
	}{
		{"default.qcow", CreateOptions{Size: 4 << 20}},
		{"c512.qcow", CreateOptions{Size: 3<<20 + 512, ClusterSize: 512}},
		{"c64k.qcow", CreateOptions{Size: 5 << 20, ClusterSize: 64 << 10}},
		{"backed.qcow", CreateOptions{Size: 2 << 20, Backing: "base.raw"}},
		{"backed-bigger.qcow", CreateOptions{Size: 3 << 20, Backing: "base.raw"}},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if err := Create(p(c.name), c.opts); err != nil {
				t.Fatal(err)
			}
			if err := Create(p(c.name), c.opts); !os.IsExist(unwrapAll(err)) {
				t.Fatalf("second create: %v (must refuse to overwrite)", err)
			}
			model := make([]byte, c.opts.Size)
			if c.opts.Backing != "" {
				copy(model, base)
			}
			img, err := Open(p(c.name), Options{Backing: testOpener(dir)})
			if err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewPCG(uint64(i), 9))
			for range 20 {
				off := rng.Int64N(c.opts.Size)
				n := min(rng.Int64N(70000)+1, c.opts.Size-off)
				b := randBytes(rng, int(n))
				if _, err := img.WriteAt(b, off); err != nil {
					t.Fatal(err)
				}
				copy(model[off:], b)
			}
			if err := img.Discard(100000, 300000); err != nil {
				t.Fatal(err)
			}
			clear(model[100000:400000])
			pat := bytes.Repeat([]byte{0xE1}, 12345)
			img.WriteAt(pat, 777777)
			copy(model[777777:], pat)
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}

			var info struct {
				Format      string `json:"format"`
				VirtualSize int64  `json:"virtual-size"`
				Backing     string `json:"backing-filename"`
				ClusterSize int64  `json:"cluster-size"`
			}
			if err := json.Unmarshal([]byte(run(t, qi, "info", "--output=json", p(c.name))), &info); err != nil {
				t.Fatal(err)
			}
			if info.Format != "qcow" || info.VirtualSize != c.opts.Size || info.Backing != c.opts.Backing {
				t.Fatalf("qemu-img info: %+v", info)
			}
			qout := run(t, qinfo, p(c.name))
			if !strings.Contains(qout, fmt.Sprintf("(%d bytes)", c.opts.Size)) {
				t.Fatalf("qcowinfo:\n%s", qout)
			}
			if i := imagetest.FirstDiff(qemuRaw(t, qi, p(c.name)), model); i >= 0 {
				t.Fatalf("qemu reads our image differently at byte %d", i)
			}
			compareTopLayerMap(t, qi, p(c.name))
			run(t, qio, "-r", "-f", "qcow", "-c", "read -P 0xe1 777777 12345", "-c", "read -P 0 100000 300000", p(c.name))
		})
	}
}

func unwrapAll(err error) error {
	for {
		u, ok := err.(interface{ Unwrap() error })
		if !ok {
			return err
		}
		err = u.Unwrap()
	}
}

// TestCreateMatchesQemu: Create's defaults give qemu-img's bytes exactly.
func TestCreateMatchesQemu(t *testing.T) {
	qi := oracle.Require(t, "qemu-img")
	dir := t.TempDir()
	for i, c := range []struct {
		size    int64
		backing string
	}{{1000, ""}, {10 << 20, ""}, {(1 << 30) + 4096, ""}, {10 << 20, "b.qcow"}, {7 << 20, "some/dir/base.img"}} {
		ours, theirs := filepath.Join(dir, fmt.Sprint("ours", i)), filepath.Join(dir, fmt.Sprint("qemu", i))
		if err := Create(ours, CreateOptions{Size: c.size, Backing: c.backing}); err != nil {
			t.Fatal(err)
		}
		args := []string{"create", "-f", "qcow"}
		if c.backing != "" {
			args = append(args, "-u", "-b", c.backing, "-F", "raw")
		}
		run(t, qi, append(args, theirs, fmt.Sprint(c.size))...)
		a, _ := os.ReadFile(ours)
		b, _ := os.ReadFile(theirs)
		if !bytes.Equal(a, b) {
			t.Fatalf("case %d: our file (%d bytes) differs from qemu-img's (%d bytes) at %d", i, len(a), len(b), imagetest.FirstDiff(a, b))
		}
	}
}

// TestMixedWriters: we write and qemu-io verifies; qemu-io writes and we
// verify; alternating on one image with a backing file.
func TestMixedWriters(t *testing.T) {
	qi := oracle.Require(t, "qemu-img")
	qio := oracle.Require(t, "qemu-io")
	dir := t.TempDir()
	path := filepath.Join(dir, "mixed.qcow")
	base := writeRandomFile(t, filepath.Join(dir, "base.raw"), 4<<20, 5)
	if err := Create(path, CreateOptions{Size: 4 << 20, Backing: "base.raw"}); err != nil {
		t.Fatal(err)
	}
	model := append([]byte(nil), base...)
	rng := rand.New(rand.NewPCG(4, 4))
	for step := range 4 {
		// We write a pattern; qemu-io checks it.
		off, n := rng.Int64N(4<<20-100000), rng.Int64N(99999)+1
		pat := byte(0x10 + step)
		img, err := Open(path, Options{Backing: testOpener(dir)})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := img.WriteAt(bytes.Repeat([]byte{pat}, int(n)), off); err != nil {
			t.Fatal(err)
		}
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
		copy(model[off:off+n], bytes.Repeat([]byte{pat}, int(n)))
		run(t, qio, "-r", "-f", "qcow", "-c", fmt.Sprintf("read -P %d %d %d", pat, off, n), path)

		// qemu-io writes a pattern; we check it.
		off2, n2 := rng.Int64N(4<<20-100000), rng.Int64N(99999)+1
		pat2 := byte(0x80 + step)
		run(t, qio, "-f", "qcow", "-c", fmt.Sprintf("write -P %d %d %d", pat2, off2, n2), path)
		copy(model[off2:off2+n2], bytes.Repeat([]byte{pat2}, int(n2)))
		if i := imagetest.FirstDiff(readAll(t, path), model); i >= 0 {
			t.Fatalf("step %d: we read differently from the model at %d", step, i)
		}
		res, err := Check(path, CheckOptions{})
		if err != nil || !res.OK() {
			t.Fatalf("step %d check: %v %+v", step, err, res)
		}
	}
	if i := imagetest.FirstDiff(qemuRaw(t, qi, path), model); i >= 0 {
		t.Fatalf("qemu reads differently from the model at %d", i)
	}
}

// TestSeedTools: img2qcow -> qcow2raw round trip, sparse both ways, and
// qcow-create as the 2006 tool behaved.
func TestSeedTools(t *testing.T) {
	qi := oracle.Require(t, "qemu-img")
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	src := writeRandomFile(t, p("src.raw"), 8<<20, 6)
	clear(src[2<<20 : 6<<20]) // a big zero run
	os.WriteFile(p("src.raw"), src, 0o644)

	ctx := context.Background()
	if err := Img2Qcow(ctx, p("img.qcow"), &memImage{data: src}); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(p("img.qcow"))
	nonZero := 0
	for i := 0; i < len(src); i += 4096 {
		if !image.IsZero(src[i : i+4096]) {
			nonZero++
		}
	}
	// Sparse: the file holds the non-zero clusters plus a little metadata.
	if limit := int64(nonZero*4096 + 64<<10); fi.Size() > limit {
		t.Fatalf("img2qcow output is %d bytes, more than %d: not sparse", fi.Size(), limit)
	}
	if i := imagetest.FirstDiff(qemuRaw(t, qi, p("img.qcow")), src); i >= 0 {
		t.Fatalf("qemu reads img2qcow output differently at %d", i)
	}
	if out := run(t, oracle.Require(t, "qcowinfo"), p("img.qcow")); !strings.Contains(out, "(8388608 bytes)") {
		t.Fatalf("qcowinfo on img2qcow output:\n%s", out)
	}
	if err := Qcow2Raw(ctx, p("back.raw"), p("img.qcow")); err != nil {
		t.Fatal(err)
	}
	back, _ := os.ReadFile(p("back.raw"))
	if !bytes.Equal(back, src) {
		t.Fatalf("round trip differs at %d", imagetest.FirstDiff(back, src))
	}
	var st syscall.Stat_t
	syscall.Stat(p("back.raw"), &st)
	if st.Blocks*512 >= int64(len(src))-(3<<20) {
		t.Fatalf("qcow2raw output uses %d bytes of %d: not sparse", st.Blocks*512, len(src))
	}
	if err := Qcow2Raw(ctx, p("back.raw"), p("img.qcow")); err == nil {
		t.Fatal("qcow2raw overwrote an existing file")
	}
	if err := Img2Qcow(ctx, p("img.qcow"), &memImage{data: src}); err == nil {
		t.Fatal("img2qcow overwrote an existing file")
	}
	seedQcowCreate(t, qi, dir, src)
}

// seedQcowCreate: qcow-create takes the size in MB; with a backing file
// the backing's size and its absolute path; -r reserves space. img.qcow in
// dir holds src.
func seedQcowCreate(t *testing.T, qi, dir string, src []byte) {
	p := func(n string) string { return filepath.Join(dir, n) }
	ctx := context.Background()
	var st syscall.Stat_t
	if err := QcowCreate(16, p("new.qcow"), "", false); err != nil {
		t.Fatal(err)
	}
	if img := openInfo(t, p("new.qcow")); img.VirtualSize != 16<<20 || img.ClusterSize != 4096 {
		t.Fatalf("qcow-create: %+v", img)
	}
	os.Symlink("img.qcow", p("link.qcow"))
	if err := QcowCreate(1, p("cow.qcow"), p("link.qcow"), false); err != nil {
		t.Fatal(err)
	}
	if info := openInfo(t, p("cow.qcow")); info.VirtualSize != 8<<20 || info.BackingFile != p("img.qcow") || info.ClusterSize != 512 {
		t.Fatalf("qcow-create with backing: %+v", info)
	}
	if i := imagetest.FirstDiff(qemuRaw(t, qi, p("cow.qcow")), src); i >= 0 {
		t.Fatalf("qemu reads the new overlay differently at %d", i)
	}
	// qcow2raw of an overlay needs the caller's opener.
	if err := Qcow2Raw(ctx, p("cow.raw"), p("cow.qcow")); !errors.Is(err, ErrNoBackingOpener) {
		t.Fatalf("qcow2raw of an overlay without an opener: %v", err)
	}
	if err := Qcow2RawWith(ctx, p("cow.raw"), p("cow.qcow"), Qcow2RawOptions{Open: Options{Backing: testOpener(dir)}}); err != nil {
		t.Fatal(err)
	}
	if back, _ := os.ReadFile(p("cow.raw")); !bytes.Equal(back, src) {
		t.Fatal("qcow2raw of an overlay differs from its backing data")
	}
	if err := QcowCreate(64, p("reserved.qcow"), "", true); err != nil {
		t.Fatal(err)
	}
	syscall.Stat(p("reserved.qcow"), &st)
	if st.Blocks*512 < 64<<20 {
		t.Fatalf("qcow-create -r reserved only %d bytes", st.Blocks*512)
	}
	if info := openInfo(t, p("reserved.qcow")); info.VirtualSize != 64<<20 {
		t.Fatalf("reserved image: %+v", info)
	}
	run(t, qi, "info", p("reserved.qcow"))
	if err := QcowCreate(1, p("x.qcow"), p("missing.raw"), false); err == nil {
		t.Fatal("qcow-create accepted a missing backing file")
	}
}

func openInfo(t *testing.T, path string) Info {
	t.Helper()
	img, err := Open(path, Options{ReadOnly: true, Backing: testOpener(filepath.Dir(path))})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	return img.Info()
}

// compareTopLayerMap: the ranges our Map calls data at depth 0 are exactly
// those `qemu-img map` reports present at depth 0.
func compareTopLayerMap(t *testing.T, qemuImg, path string) {
	t.Helper()
	var qm []struct {
		Start, Length int64
		Depth         int
		Present       bool
	}
	if err := json.Unmarshal([]byte(run(t, qemuImg, "map", "--output=json", path)), &qm); err != nil {
		t.Fatal(err)
	}
	img, err := Open(path, Options{ReadOnly: true, Backing: testOpener(filepath.Dir(path))})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	ext, err := img.Map(0, img.Size())
	if err != nil {
		t.Fatal(err)
	}
	top := func(off int64) (ours, theirs bool) {
		for _, e := range ext {
			if off >= e.Offset && off < e.Offset+e.Length {
				ours = e.Depth == 0 && e.Kind == image.Data
			}
		}
		for _, e := range qm {
			if off >= e.Start && off < e.Start+e.Length {
				theirs = e.Depth == 0 && e.Present
			}
		}
		return
	}
	for off := int64(0); off < img.Size(); off += 512 {
		if o, q := top(off); o != q {
			t.Fatalf("at %d our map says top-layer data=%v, qemu-img map says %v", off, o, q)
		}
	}
}
