package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
)

// workerSum is the SHA-256 (hex) of the blktap-worker binary built
// together with this blktap: `make build` (and every target that builds
// blktap) builds the worker first and passes its sum with
// -X main.workerSum=. Empty in a plain `go build`: blktap then runs its
// own workers.
var workerSum string

// workerName is the worker binary's name; workerDirs are where it is
// looked for, relative to blktap's own directory: beside it (a build
// tree's bin/) and ../libexec/blktap (an installed /usr/sbin/blktap).
const workerName = "blktap-worker"

var workerDirs = []string{".", "../libexec/blktap"}

// workerExe names the binary the daemon starts each disk's worker from.
// It is the blktap-worker built with this blktap, when one is found whose
// SHA-256 is workerSum; otherwise "" (the daemon then starts blktap
// itself as `blktap __worker`), with the reason logged. The small binary
// saves every disk about 0.7 MiB of private memory; the sum ensures that
// a worker from another build, which may speak another version of the
// private control protocol (a copied bin/blktap beside an old
// bin/blktap-worker, a half-finished install), never serves a disk.
func workerExe(log *slog.Logger) string {
	self, err := os.Executable()
	if err != nil {
		log.Info("workers run as `blktap __worker`", "why", err)
		return ""
	}
	path, why := findWorker(self, workerSum)
	if path == "" {
		log.Info("workers run as `blktap __worker`", "why", why)
		return ""
	}
	log.Info("workers run from "+workerName, "path", path)
	return path
}

// findWorker looks for the worker of sum beside the blktap binary self
// and in its libexec directory; "" and the reason when there is none.
func findWorker(self, sum string) (path, why string) {
	if sum == "" {
		return "", "this blktap was built without its worker's sum (scripts/build.sh sets it)"
	}
	if s, err := filepath.EvalSymlinks(self); err == nil {
		self = s
	}
	why = fmt.Sprintf("no %s beside %s or in %s", workerName, self, filepath.Clean(filepath.Join(filepath.Dir(self), workerDirs[1])))
	for _, d := range workerDirs {
		p := filepath.Clean(filepath.Join(filepath.Dir(self), d, workerName))
		got, err := fileSum(p)
		switch {
		case os.IsNotExist(err):
			continue
		case err != nil:
			return "", err.Error()
		case got != sum:
			return "", fmt.Sprintf("%s is not the worker this blktap was built with (SHA-256 %.12s, want %.12s)", p, got, sum)
		}
		return p, ""
	}
	return "", why
}

func fileSum(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
