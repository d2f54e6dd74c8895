//go:build rbd

package rbd

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	librbd "github.com/ceph/go-ceph/rbd"

	"github.com/blktap-go/blktap/formats/image"
)

// lock takes the image's exclusive lock for as long as it is open
// (package doc, 1).
func (im *Image) lock() error {
	features, err := im.img.GetFeatures()
	if err != nil {
		return fmt.Errorf("features: %w", err)
	}
	if features&librbd.FeatureExclusiveLock == 0 {
		return fmt.Errorf("%w: the image lacks the exclusive-lock feature, so nothing would stop a second host from writing it (rbd feature enable %s exclusive-lock)",
			image.ErrUnsupported, im.spec.Name())
	}
	// Before asking: librbd's acquire waits out a dead owner's watch.
	im.breakDeadLocalHolder()
	if err := im.img.LockAcquire(librbd.LockModeExclusive); err != nil {
		if errors.Is(err, librbd.ErrNotFound) {
			return err
		}
		return &LockedError{Image: im.spec.Name(), Holder: im.describeHolder()}
	}
	im.sayWhoHolds()
	return nil
}

// holder is what a lock holder writes of itself under holderKey.
type holder struct {
	host   string
	pid    int
	client string // librbd's lock owner: the client's address
}

func (h holder) String() string {
	return fmt.Sprintf("blktap on host %s, pid %d, client %s", h.host, h.pid, h.client)
}

func parseHolder(s string) (holder, bool) {
	var h holder
	rest, ok := strings.CutPrefix(s, "blktap on host ")
	if !ok {
		return h, false
	}
	h.host, rest, ok = strings.Cut(rest, ", pid ")
	if !ok {
		return h, false
	}
	pid, client, ok := strings.Cut(rest, ", client ")
	if !ok {
		return h, false
	}
	n, err := strconv.Atoi(pid)
	if err != nil {
		return h, false
	}
	h.pid, h.client = n, client
	return h, true
}

// sayWhoHolds writes host, pid and lock owner under holderKey. Best
// effort: the lock holds without it; it names us to a refused opener and
// lets a worker restarted on this host fence a predecessor that died.
func (im *Image) sayWhoHolds() {
	owners, err := im.img.LockGetOwners()
	if err != nil || len(owners) != 1 {
		return
	}
	host, _ := os.Hostname()
	h := holder{host: host, pid: os.Getpid(), client: owners[0].Owner}
	_ = im.img.SetMetadata(holderKey, h.String())
}

// breakDeadLocalHolder breaks the lock of a holder that was a process on
// this host and is gone (a worker killed -9, restarted by the daemon): it
// would otherwise keep the lock until the OSDs time its watch out, 30 s of
// a disk unserved. It acts only when the holder wrote itself down as this
// host's, that record names the current owner, and its pid is no longer
// running: never on a live client or another host's. librbd blocklists
// the owner as it breaks the lock, so even a wrong guess cannot make two
// writers.
func (im *Image) breakDeadLocalHolder() bool {
	// No owner: nothing to break (ENOENT from librbd).
	owners, err := im.img.LockGetOwners()
	if err != nil || len(owners) != 1 {
		return false
	}
	rec, err := im.img.GetMetadata(holderKey)
	if err != nil {
		return false
	}
	h, ok := parseHolder(rec)
	host, _ := os.Hostname()
	if !ok || h.host != host || h.client != owners[0].Owner || h.pid <= 0 || processAlive(h.pid) {
		return false
	}
	return im.img.LockBreak(librbd.LockModeExclusive, owners[0].Owner) == nil
}

// processAlive: kill(pid, 0) succeeds or is refused for permission, which
// both mean the process exists.
func processAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}
