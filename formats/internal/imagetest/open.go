package imagetest

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// OpenOn opens path read-write on fs (a crash-test disk, say) and the
// image in it with open, the format's own opener over a host file; it
// fails t on an error.
func OpenOn[T, O any](t testing.TB, fs hostfile.FS, path string, open func(hostfile.File, string, O) (T, error), opts O) T {
	t.Helper()
	f, err := fs.Open(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	img, err := open(f, path, opts)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// Fixed is a backing opener that hands out img whatever is asked for.
func Fixed(img image.Image) image.OpenFunc {
	return func(string, string) (image.Image, error) { return img, nil }
}

// OnDisk reads the files at paths into a crash-test disk's contents, each
// under /d/ by its base name (crashfs.FromImage takes it).
func OnDisk(t testing.TB, paths ...string) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		files["/d/"+filepath.Base(p)] = b
	}
	return files
}
