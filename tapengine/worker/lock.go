package worker

import (
	"fmt"
	"os"
	"path/filepath"
)

// LockImage takes the lock a worker holds on the image it serves
// (exclusive for writing, shared for reading) for a tool that changes an
// image in place, such as `image rebase` and `image commit`: it fails
// with ErrInUse while a worker has the image open, and a worker cannot
// open it until the returned file is closed.
func LockImage(path string, readOnly bool) (*os.File, error) {
	return lockImage(path, readOnly)
}

// ResolveBacking is the file the backing name an image at child records
// stands for: a relative name is child's directory's, and symlinks are
// resolved (so the result can be confined and compared).
func ResolveBacking(child, name string) (string, error) {
	p := name
	if !filepath.IsAbs(p) {
		p = filepath.Join(filepath.Dir(child), p)
	}
	real, err := filepath.EvalSymlinks(p)
	if err != nil {
		return "", fmt.Errorf("backing file %q: %w", name, err)
	}
	return real, nil
}
