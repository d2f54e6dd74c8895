package ram

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/imagetest"
	"github.com/blktap-go/blktap/formats/raw"
	"github.com/blktap-go/blktap/internal/oracle"
)

// shmDir gives each test its own directory on tmpfs, as in production.
func shmDir(t testing.TB) string {
	t.Helper()
	base := DefaultDir
	if st, err := os.Stat(base); err != nil || !st.IsDir() {
		base = "" // no /dev/shm: the test still runs on the default temp dir
	}
	d, err := os.MkdirTemp(base, "blktap-ram-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func mustOpen(t testing.TB, name string, size int64, opts Options) *Image {
	t.Helper()
	img, err := Open(name, size, opts)
	if err != nil {
		t.Fatalf("Open(%q, %d): %v", name, size, err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

func TestSharedBetweenAttachments(t *testing.T) {
	opts := Options{Dir: shmDir(t)}
	a := mustOpen(t, "shared", 1<<20, opts)
	b := mustOpen(t, "shared", 0, opts)
	if b.Size() != 1<<20 {
		t.Fatalf("second attach size %d, want %d", b.Size(), 1<<20)
	}
	want := imagetest.Pattern(1, 12345)
	if _, err := a.WriteAt(want, 7777); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	if _, err := b.ReadAt(got, 7777); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("b does not see a's write")
	}
	// Untouched ranges read as zeros.
	if _, err := b.ReadAt(got, 1<<19); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, len(got))) {
		t.Fatal("untouched range is not zero")
	}
}

// The helper process: attach, check what the parent wrote, write our own
// pattern, and try to Remove (which must say busy: the parent is attached).
func TestMain(m *testing.M) {
	if dir := os.Getenv("BLKTAP_RAM_CHILD_DIR"); dir != "" {
		os.Exit(child(dir))
	}
	os.Exit(m.Run())
}

func child(dir string) int {
	img, err := Open("xproc", 0, Options{Dir: dir})
	if err != nil {
		fmt.Fprintln(os.Stderr, "child open:", err)
		return 2
	}
	got := make([]byte, 8192)
	if _, err := img.ReadAt(got, 4096); err != nil || !bytes.Equal(got, imagetest.Pattern(10, 8192)) {
		fmt.Fprintln(os.Stderr, "child: parent's write not visible", err)
		return 3
	}
	if _, err := img.WriteAt(imagetest.Pattern(11, 8192), 1<<20); err != nil {
		fmt.Fprintln(os.Stderr, "child write:", err)
		return 4
	}
	if err := Remove("xproc", Options{Dir: dir}); !errors.Is(err, ErrBusy) {
		fmt.Fprintln(os.Stderr, "child: Remove while attached gave", err)
		return 5
	}
	// Exit without Close: a crashed worker must not leave a reference.
	return 0
}

func TestTwoProcesses(t *testing.T) {
	dir := shmDir(t)
	img := mustOpen(t, "xproc", 4<<20, Options{Dir: dir})
	if _, err := img.WriteAt(imagetest.Pattern(10, 8192), 4096); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "BLKTAP_RAM_CHILD_DIR="+dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("child process: %v\n%s", err, out)
	}
	got := make([]byte, 8192)
	if _, err := img.ReadAt(got, 1<<20); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, imagetest.Pattern(11, 8192)) {
		t.Fatal("the child's write is not visible in the parent")
	}
	// The child exited without Close; only our reference remains.
	if err := Remove("xproc", Options{Dir: dir}); !errors.Is(err, ErrBusy) {
		t.Fatalf("Remove while attached: %v, want ErrBusy", err)
	}
	img.Close()
	if err := Remove("xproc", Options{Dir: dir}); err != nil {
		t.Fatalf("Remove after the last detach: %v", err)
	}
	if _, err := os.Stat(Path(dir, "xproc")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("file still there after Remove: %v", err)
	}
}

func TestLifetime(t *testing.T) {
	opts := Options{Dir: shmDir(t)}
	if _, err := Open("nope", 0, opts); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("attach missing without size: %v", err)
	}
	if _, err := Open("nope", 4096, Options{Dir: opts.Dir, ReadOnly: true}); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("read-only attach of a missing disk: %v", err)
	}
	a := mustOpen(t, "keep", 65536, opts)
	a.WriteAt([]byte("survives detach"), 100)
	a.Close()
	// Every user detached: the data stays until Remove (see package doc).
	b := mustOpen(t, "keep", 65536, opts)
	got := make([]byte, 15)
	b.ReadAt(got, 100)
	if string(got) != "survives detach" {
		t.Fatalf("after reattach read %q", got)
	}
	if _, err := Open("keep", 131072, opts); !errors.Is(err, ErrSizeMismatch) {
		t.Fatalf("size mismatch: %v", err)
	}
	b.Close()
	if err := Remove("keep", opts); err != nil {
		t.Fatal(err)
	}
	if err := Remove("keep", opts); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("second Remove: %v", err)
	}
	c := mustOpen(t, "keep", 65536, opts)
	c.ReadAt(got, 100)
	if !bytes.Equal(got, make([]byte, 15)) {
		t.Fatalf("a removed disk came back with data %q", got)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); !errors.Is(err, image.ErrClosed) {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := c.ReadAt(got, 0); !errors.Is(err, image.ErrClosed) {
		t.Fatalf("read after Close: %v", err)
	}
}

func TestReadOnlyAndRange(t *testing.T) {
	opts := Options{Dir: shmDir(t)}
	w := mustOpen(t, "ro", 8192, opts)
	r := mustOpen(t, "ro", 0, Options{Dir: opts.Dir, ReadOnly: true})
	if _, err := r.WriteAt([]byte{1}, 0); !errors.Is(err, image.ErrReadOnly) {
		t.Fatalf("write on read-only: %v", err)
	}
	if err := r.Discard(0, 4096); !errors.Is(err, image.ErrReadOnly) {
		t.Fatalf("discard on read-only: %v", err)
	}
	for _, c := range []struct {
		off int64
		n   int
	}{{8192, 1}, {8191, 2}, {-1, 1}, {1 << 62, 1}} {
		if _, err := w.WriteAt(make([]byte, c.n), c.off); !errors.Is(err, image.ErrOutOfRange) {
			t.Errorf("write %d+%d: %v", c.off, c.n, err)
		}
		if _, err := r.ReadAt(make([]byte, c.n), c.off); !errors.Is(err, image.ErrOutOfRange) {
			t.Errorf("read %d+%d: %v", c.off, c.n, err)
		}
	}
	if err := w.Discard(4096, 8192); !errors.Is(err, image.ErrOutOfRange) {
		t.Errorf("discard past the end: %v", err)
	}
	if _, err := w.Map(0, 8193); !errors.Is(err, image.ErrOutOfRange) {
		t.Errorf("map past the end: %v", err)
	}
}

func TestMemoryLimit(t *testing.T) {
	opts := Options{Dir: shmDir(t), MaxBytes: 64 << 10}
	img := mustOpen(t, "lim", 1<<30, opts) // declared size far above the limit: sparse
	if _, err := img.WriteAt(imagetest.Pattern(2, 64<<10), 0); err != nil {
		t.Fatalf("write up to the limit: %v", err)
	}
	_, err := img.WriteAt(make([]byte, 4096), 1<<20)
	if !errors.Is(err, ErrMemoryLimit) || !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("write past the limit: %v, want ErrMemoryLimit and ENOSPC", err)
	}
	// Rewriting allocated memory allocates nothing and must succeed.
	if _, err := img.WriteAt(imagetest.Pattern(3, 32<<10), 16<<10); err != nil {
		t.Fatalf("rewrite within the limit: %v", err)
	}
	if err := img.Discard(0, 8192); err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(make([]byte, 4096), 1<<20); err != nil {
		t.Fatalf("write after discard freed memory: %v", err)
	}
}

func TestBadNames(t *testing.T) {
	opts := Options{Dir: shmDir(t)}
	for _, n := range []string{"", ".", "..", "a/b", "../x", "a b", "ü", "x\x00", "a?b", string(bytes.Repeat([]byte("a"), 129))} {
		if _, err := Open(n, 4096, opts); !errors.Is(err, ErrBadName) {
			t.Errorf("Open(%q): %v, want ErrBadName", n, err)
		}
		if err := Remove(n, opts); !errors.Is(err, ErrBadName) {
			t.Errorf("Remove(%q): %v, want ErrBadName", n, err)
		}
	}
	for _, n := range []string{"a", "vm-1.disk_0", "...", "-x"} {
		if err := ValidateName(n); err != nil {
			t.Errorf("ValidateName(%q): %v", n, err)
		}
	}
}

func TestParseParams(t *testing.T) {
	good := []struct {
		in   string
		name string
		size int64
	}{
		{"disk1", "disk1", 0},
		{"ram:disk1", "disk1", 0},
		{"ram:disk1?size=1G", "disk1", 1 << 30},
		{"d?size=512", "d", 512},
		{"d?size=64K", "d", 64 << 10},
		{"d?size=3MiB", "d", 3 << 20},
		{"d?size=2t", "d", 2 << 40},
	}
	for _, c := range good {
		name, size, err := ParseParams(c.in)
		if err != nil || name != c.name || size != c.size {
			t.Errorf("ParseParams(%q) = %q, %d, %v; want %q, %d", c.in, name, size, err, c.name, c.size)
		}
	}
	for _, in := range []string{"", "ram:", "a/b?size=1G", "d?", "d?size=", "d?size=0", "d?size=1GB", "d?size=-1",
		"d?size=1G&size=1G", "d?sz=1G", "d?size=2E", "d?size=99999999999999999999", "d?size=1X", "d?size=1G&"} {
		if _, _, err := ParseParams(in); !errors.Is(err, ErrBadParams) {
			t.Errorf("ParseParams(%q): %v, want ErrBadParams", in, err)
		}
	}
}

func TestPlantedFiles(t *testing.T) {
	dir := shmDir(t)
	opts := Options{Dir: dir}
	cases := []struct {
		name  string
		data  []byte
		class error
	}{
		{"short", []byte("BLKT"), image.ErrWrongFormat},
		{"foreign", bytes.Repeat([]byte("x"), 8192), image.ErrWrongFormat},
		{"version", func() []byte { b := header{size: 4096}.encode(); b[8] = 9; return append(b, make([]byte, 4096)...) }(), image.ErrUnsupported},
		{"truncated", header{size: 1 << 20}.encode(), image.ErrCorrupt},
	}
	for _, c := range cases {
		if err := os.WriteFile(Path(dir, c.name), c.data, 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := Open(c.name, 0, opts); !errors.Is(err, c.class) {
			t.Errorf("%s: %v, want %v", c.name, err, c.class)
		}
	}
	if err := os.Symlink("/etc/passwd", Path(dir, "link")); err != nil {
		t.Fatal(err)
	}
	if _, err := Open("link", 0, opts); err == nil || !errors.Is(err, unix.ELOOP) {
		t.Errorf("symlink: %v, want ELOOP", err)
	}
}

// TestMapAgainstQemu checks Map, Discard and the data layout with
// qemu-img and qemu-io reading the backing file as raw at offset 4096.
func TestMapAgainstQemu(t *testing.T) {
	qimg := oracle.Require(t, "qemu-img")
	qio := oracle.Require(t, "qemu-io")
	opts := Options{Dir: shmDir(t)}
	const size = 8 << 20
	img := mustOpen(t, "map", size, opts)
	img.WriteAt(bytes.Repeat([]byte{0xab}, 128<<10), 1<<20)
	img.WriteAt(bytes.Repeat([]byte{0xcd}, 64<<10), 5<<20)
	img.WriteAt(bytes.Repeat([]byte{0xef}, 4096), size-4096)
	if err := img.Discard(1<<20+32<<10, 32<<10); err != nil {
		t.Fatal(err)
	}
	spec := fmt.Sprintf("driver=raw,offset=%d,size=%d,file.driver=file,file.filename=%s", HeaderSize, size, img.Path())
	out, err := exec.Command(qimg, "map", "--output=json", "--image-opts", spec).Output()
	if err != nil {
		t.Fatalf("qemu-img map: %v", err)
	}
	var qm []struct {
		Start, Length int64
		Data          bool
	}
	if err := json.Unmarshal(out, &qm); err != nil {
		t.Fatalf("qemu-img map output: %v\n%s", err, out)
	}
	// Both sides as a per-page data bit: qemu merges differently.
	want := make([]bool, size/4096)
	for _, e := range qm {
		for p := e.Start / 4096; p < (e.Start+e.Length)/4096; p++ {
			want[p] = e.Data
		}
	}
	ext, err := img.Map(0, size)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]bool, size/4096)
	imagetest.Tiles(t, ext, size)
	for _, e := range ext {
		for p := e.Offset / 4096; p < (e.Offset+e.Length)/4096; p++ {
			got[p] = e.Kind == image.Data
		}
	}
	for p := range want {
		if got[p] != want[p] {
			t.Fatalf("page %d: our Map says data=%v, qemu-img map says %v\nours: %+v\nqemu: %s", p, got[p], want[p], ext, out)
		}
	}
	if !want[(1<<20)/4096] || want[(1<<20+40<<10)/4096] || !want[(5<<20)/4096] || want[(3<<20)/4096] {
		t.Fatalf("qemu-img map does not show the writes and the discard: %s", out)
	}
	for _, c := range []string{
		"read -P 0xab 1M 32K", "read -P 0 1056K 32K", "read -P 0xab 1088K 64K",
		"read -P 0xcd 5M 64K", "read -P 0xef 8188K 4K", "read -P 0 2M 1M",
	} {
		if out, err := exec.Command(qio, "-r", "--image-opts", spec, "-c", c).CombinedOutput(); err != nil ||
			bytes.Contains(out, []byte("Pattern verification failed")) {
			t.Errorf("qemu-io %q: %v\n%s", c, err, out)
		}
	}
}

func TestConcurrent(t *testing.T) {
	opts := Options{Dir: shmDir(t)}
	imgs := []*Image{mustOpen(t, "conc", 4<<20, opts), mustOpen(t, "conc", 0, opts)}
	var wg sync.WaitGroup
	const workers, chunk = 8, 16 << 10
	for w := range workers {
		wg.Go(func() {
			img := imgs[w%2]
			for i := range 16 {
				off := int64((w*16 + i) * chunk)
				p := imagetest.Pattern(uint64(w*100+i), chunk)
				if _, err := img.WriteAt(p, off); err != nil {
					t.Error(err)
					return
				}
				got := make([]byte, chunk)
				if _, err := imgs[(w+1)%2].ReadAt(got, off); err != nil || !bytes.Equal(got, p) {
					t.Errorf("worker %d chunk %d: %v / mismatch", w, i, err)
					return
				}
				if _, err := img.Map(0, img.Size()); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
}

func TestRacingCreators(t *testing.T) {
	opts := Options{Dir: shmDir(t)}
	var wg sync.WaitGroup
	imgs := make([]*Image, 8)
	for i := range imgs {
		wg.Go(func() {
			img, err := Open("race", 1<<20, opts)
			if err != nil {
				t.Error(err)
				return
			}
			imgs[i] = img
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	imgs[0].WriteAt([]byte("one disk"), 0)
	for i, img := range imgs {
		got := make([]byte, 8)
		img.ReadAt(got, 0)
		if string(got) != "one disk" {
			t.Errorf("creator %d got its own disk", i)
		}
		img.Close()
	}
	ents, _ := os.ReadDir(opts.Dir)
	if len(ents) != 1 {
		t.Errorf("%d files left in the dir, want 1: %v", len(ents), ents)
	}
}

func BenchmarkWrite4K(b *testing.B) {
	img := mustOpen(b, "bench", 256<<20, Options{Dir: shmDir(b)})
	p := imagetest.Pattern(1, 4096)
	b.SetBytes(4096)
	for i := 0; b.Loop(); i++ {
		if _, err := img.WriteAt(p, int64(i%65536)*4096); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkRead4K(b *testing.B) {
	img := mustOpen(b, "bench", 256<<20, Options{Dir: shmDir(b)})
	p := make([]byte, 4096)
	b.SetBytes(4096)
	for i := 0; b.Loop(); i++ {
		if _, err := img.ReadAt(p, int64(i%65536)*4096); err != nil {
			b.Fatal(err)
		}
	}
}

// TestLoadSave: a raw image made and written by qemu loads into a RAM
// disk, is changed there, is saved to a new raw file, and qemu-img
// compare agrees with what was expected.
func TestLoadSave(t *testing.T) {
	qimg := oracle.Require(t, "qemu-img")
	qio := oracle.Require(t, "qemu-io")
	dir := t.TempDir()
	src, out := dir+"/src.raw", dir+"/out.raw"
	const size = 4 << 20
	for _, args := range [][]string{
		{qimg, "create", "-f", "raw", src, "4M"},
		{qio, "-f", "raw", "-c", "write -P 0x11 0 64K", "-c", "write -P 0x22 3M 4K", src},
	} {
		if b, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, b)
		}
	}
	s, err := raw.Open(src, raw.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	img := mustOpen(t, "ls", size, Options{Dir: shmDir(t)})
	img.WriteAt([]byte("stale"), 2<<20) // Load must make this zero again
	if err := img.Load(s); err != nil {
		t.Fatal(err)
	}
	if b, err := exec.Command(qimg, "compare", "--image-opts", "driver=raw,file.driver=file,file.filename="+src,
		fmt.Sprintf("driver=raw,offset=%d,size=%d,file.driver=file,file.filename=%s", HeaderSize, size, img.Path())).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare src vs RAM disk: %v\n%s", err, b)
	}
	img.WriteAt(bytes.Repeat([]byte{0x33}, 8192), 1<<20)
	if err := raw.Create(out, size); err != nil {
		t.Fatal(err)
	}
	d, err := raw.Open(out, raw.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Save(d); err != nil {
		t.Fatal(err)
	}
	d.Close()
	if b, err := exec.Command(qio, "-f", "raw", "-c", "write -P 0x33 1M 8K", src).CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, b)
	}
	if b, err := exec.Command(qimg, "compare", "-f", "raw", "-F", "raw", src, out).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare expected vs saved: %v\n%s", err, b)
	}
	small := mustOpen(t, "small", 4096, Options{Dir: img.Path()[:len(img.Path())-len("/"+FilePrefix+"ls")]})
	if err := small.Load(s); err == nil {
		t.Fatal("loading a 4M image into a 4K disk succeeded")
	}
}
