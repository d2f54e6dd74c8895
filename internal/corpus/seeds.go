// Package corpus reads a fuzz target's seed corpus from the package's
// testdata directory. It is imported only from _test.go files.
package corpus

import (
	"os"
	"path/filepath"
	"testing"
)

// Files returns the contents of the files under testdata that match
// pattern (filepath.Match syntax, e.g. "seeds/*.ring"), in name order. A
// file that cannot be read fails t: a seed that silently drops out would
// leave the fuzz target less covered than its author meant.
func Files(t testing.TB, pattern string) [][]byte {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join("testdata", pattern))
	if err != nil {
		t.Fatal(err)
	}
	out := make([][]byte, 0, len(paths))
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b)
	}
	return out
}
