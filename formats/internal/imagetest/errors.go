package imagetest

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
)

// Classed reports whether err is an *image.FormatError of class (image.ErrCorrupt,
// say), and fails t, naming what, when it is not: a format's refusal
// must say which kind of fault it found.
func Classed(t testing.TB, what string, err, class error) bool {
	t.Helper()
	var fe *image.FormatError
	if !errors.Is(err, class) || !errors.As(err, &fe) {
		t.Errorf("%s: got %v, want a FormatError of class %v", what, err, class)
		return false
	}
	return true
}

// Testdata is the package's testdata/name, failing t if it cannot be read.
func Testdata(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Stored is the golden step of a test that keeps generated seeds in
// testdata: with update it writes b to testdata/name and returns nil;
// otherwise it returns what testdata/name holds, failing t, with how to
// regenerate it (run), when it cannot be read.
func Stored(t testing.TB, name string, b []byte, update bool, run string) []byte {
	t.Helper()
	p := filepath.Join("testdata", name)
	if update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return nil
	}
	got, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("%v (run %s)", err, run)
	}
	return got
}
