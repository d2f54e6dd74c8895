package formats

import (
	"bytes"
	"errors"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/internal/oracle"
)

func TestNormalize(t *testing.T) {
	for in, want := range map[string]string{
		"raw": "raw", "aio": "raw", "qcow": "qcow", "qcow2": "qcow2", "vhd": "vhd", "vpc": "vhd",
		"vmdk": "vmdk", "ram": "ram", "nbd": "nbd",
	} {
		if got, err := Normalize(in); got != want || err != nil {
			t.Errorf("Normalize(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "RAW", "qcow3", "tap:aio", " raw"} {
		_, err := Normalize(in)
		if !errors.Is(err, ErrUnknownFormat) || !strings.Contains(err.Error(), "raw, qcow, qcow2, vhd, vmdk, ram, nbd") {
			t.Errorf("Normalize(%q): %v; want ErrUnknownFormat listing the valid names", in, err)
		}
	}
}

// probeFixtures maps testdata/probe files to the expected format, or to
// "!unsupported" / "!corrupt" for the error class.
var probeFixtures = map[string]string{
	"qcow.img": "qcow", "qcow2-v2.img": "qcow2", "qcow2-v3.img": "qcow2",
	"vhd-dynamic.img": "vhd", "vhd-fixed.img": "vhd",
	"vmdk-sparse.img": "vmdk", "vmdk-descriptor.img": "vmdk", "vmdk-stream.img": "vmdk",
	"raw-zeros.img": "raw", "raw-empty.img": "raw", "raw-bootsector.img": "raw",
	"qed.img": "!unsupported", "vhdx.img": "!unsupported", "vdi.img": "!unsupported",
	"qcow-bad-version.img": "!unsupported", "qcow-truncated-version.img": "!corrupt",
}

func checkProbe(t *testing.T, name, want string, got string, err error) {
	t.Helper()
	switch want {
	case "!unsupported":
		if !errors.Is(err, ErrUnsupported) {
			t.Errorf("%s: Probe = %q, %v; want ErrUnsupported", name, got, err)
		}
	case "!corrupt":
		if !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: Probe = %q, %v; want ErrCorrupt", name, got, err)
		}
	default:
		if got != want || err != nil {
			t.Errorf("%s: Probe = %q, %v; want %q", name, got, err, want)
		}
	}
}

func TestProbeFixtures(t *testing.T) {
	ents, err := os.ReadDir("testdata/probe")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		want, ok := probeFixtures[e.Name()]
		if !ok {
			t.Errorf("fixture %s has no expectation", e.Name())
			continue
		}
		got, err := Probe(filepath.Join("testdata/probe", e.Name()))
		checkProbe(t, e.Name(), want, got, err)
	}
}

// Images made by qemu-img right now, whole, not only their first bytes.
func TestProbeQemuImages(t *testing.T) {
	qimg := oracle.Require(t, "qemu-img")
	dir := t.TempDir()
	cases := []struct {
		fmt  string
		opts []string
		want string
	}{
		{"raw", nil, "raw"},
		{"qcow", nil, "qcow"},
		{"qcow2", []string{"-o", "compat=0.10"}, "qcow2"},
		{"qcow2", nil, "qcow2"},
		{"vpc", nil, "vhd"},
		{"vpc", []string{"-o", "subformat=fixed"}, "vhd"},
		{"vmdk", nil, "vmdk"},
		{"vmdk", []string{"-o", "subformat=monolithicFlat"}, "vmdk"},
		{"vmdk", []string{"-o", "subformat=streamOptimized"}, "vmdk"},
		{"qed", nil, "!unsupported"},
		{"vhdx", nil, "!unsupported"},
		{"vdi", nil, "!unsupported"},
	}
	for i, c := range cases {
		p := filepath.Join(dir, "img"+strconv.Itoa(i)+"."+c.fmt)
		args := append([]string{"create", "-q", "-f", c.fmt}, c.opts...)
		if out, err := exec.Command(qimg, append(args, p, "3M")...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
		}
		got, err := Probe(p)
		checkProbe(t, c.fmt+strings.Join(c.opts, ""), c.want, got, err)
	}
}

func FuzzProbe(f *testing.F) {
	ents, err := os.ReadDir("testdata/probe")
	if err != nil {
		f.Fatal(err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("testdata/probe", e.Name()))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		name, err := probe(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			if !errors.Is(err, ErrUnsupported) && !errors.Is(err, ErrCorrupt) {
				t.Fatalf("unclassified error %v", err)
			}
			return
		}
		if _, err := Normalize(name); err != nil {
			t.Fatalf("probe returned %q: %v", name, err)
		}
		if name != "raw" && len(b) < 4 {
			t.Fatalf("%q from %d bytes", name, len(b))
		}
	})
}

func TestProbeErrors(t *testing.T) {
	if _, err := Probe(filepath.Join(t.TempDir(), "missing")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	if _, err := Probe(t.TempDir()); !errors.Is(err, ErrWrongFormat) {
		t.Errorf("directory: %v", err)
	}
}

var (
	builtInFileFormats = []string{"qcow", "qcow2", "vmdk", "vhd"}
	notBuiltIn         = []string{}
)

func TestOpenCreateDispatch(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "a.img")
	if err := Create("aio", p, CreateOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if err := Create("raw", p, CreateOptions{Size: 2 << 20}); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("Create over an existing image: %v", err)
	}
	img, err := Open("aio", p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if img.Size() != 1<<20 {
		t.Errorf("size %d", img.Size())
	}
	if _, err := img.WriteAt([]byte("x"), 0); err != nil {
		t.Error(err)
	}
	img.Close()
	ro, err := Open("raw", p, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ro.WriteAt([]byte("x"), 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("read-only write: %v", err)
	}
	ro.Close()

	// Formats with image files: a raw file is the wrong format for them,
	// and what Create makes, Open opens at the declared size.
	for _, f := range builtInFileFormats {
		if _, err := Open(f, p, Options{}); !errors.Is(err, ErrWrongFormat) {
			t.Errorf("Open(%q) of a raw file: %v; want ErrWrongFormat", f, err)
		}
		np := filepath.Join(dir, "new-"+f)
		if err := Create(f, np, CreateOptions{Size: 1 << 20}); err != nil {
			t.Errorf("Create(%q): %v", f, err)
			continue
		}
		if err := Create(f, np, CreateOptions{Size: 1 << 20}); !errors.Is(err, fs.ErrExist) {
			t.Errorf("Create(%q) over an existing file: %v; want fs.ErrExist", f, err)
		}
		img, err := Open(f, np, Options{})
		if err != nil {
			t.Errorf("Open(%q) of a new image: %v", f, err)
			continue
		}
		if img.Size() != 1<<20 {
			t.Errorf("%s: size %d", f, img.Size())
		}
		img.Close()
		if got, err := Probe(np); err != nil || got != f {
			t.Errorf("Probe of a new %s image: %q, %v", f, got, err)
		}
	}
	for _, f := range notBuiltIn {
		if _, err := Open(f, p, Options{}); !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), f) {
			t.Errorf("Open(%q): %v; want ErrUnsupported naming it", f, err)
		}
		if err := Create(f, filepath.Join(dir, "new-"+f), CreateOptions{Size: 1 << 20}); !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), f) {
			t.Errorf("Create(%q): %v; want ErrUnsupported naming it", f, err)
		}
	}
	if _, err := Open("qcow3", p, Options{}); !errors.Is(err, ErrUnknownFormat) {
		t.Errorf("unknown format: %v", err)
	}
	for _, o := range []CreateOptions{
		{Size: 1, Backing: p}, {Size: 1, ClusterSize: 65536}, {Size: -1}, {Size: 1, BackingFormat: "raw"},
	} {
		if err := Create("raw", filepath.Join(dir, "bad"), o); err == nil {
			t.Errorf("Create raw %+v accepted", o)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "bad")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a refused Create left a file behind: %v", err)
	}
}

// docs/ARCHITECTURE.md, section "Arrows": formats imports nothing of the project outside
// formats/ but the leaves internal/units, internal/rbdspec and
// internal/nbdwire, and no
// format shells out (os/exec) outside tests.
// TestOpenErrorIsNilImage: a format that fails to open gives a nil Image,
// not an Image holding a nil pointer (which a caller's img != nil check
// would take for an open image, and Close would crash on).
func TestOpenErrorIsNilImage(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "missing")
	for _, c := range []struct{ format, path string }{
		{"raw", missing}, {"qcow", missing}, {"qcow2", missing}, {"vmdk", missing},
		{"vhd", missing}, {"ram", "?size=x"}, {"nbd", "nbd+unix:///x?socket=" + missing},
	} {
		img, err := Open(c.format, c.path, Options{})
		if err == nil || img != nil {
			t.Errorf("%s %s: %v, %#v; want an error and a nil Image", c.format, c.path, err, img)
		}
	}
}

func TestLayering(t *testing.T) {
	const module = "github.com/blktap-go/blktap/"
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == "testdata" {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.ImportsOnly)
		if err != nil {
			return err
		}
		for _, imp := range f.Imports {
			p, _ := strconv.Unquote(imp.Path.Value)
			if p == "os/exec" {
				t.Errorf("%s imports os/exec", path)
			}
			if strings.HasPrefix(p, module) && !strings.HasPrefix(p, module+"formats/") && p != module+"internal/units" && p != module+"internal/rbdspec" && p != module+"internal/nbdwire" {
				t.Errorf("%s imports %s: formats imports nothing of the project", path, p)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
