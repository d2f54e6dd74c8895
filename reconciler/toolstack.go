package reconciler

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/blktap-go/blktap/xenstore"
)

// DeviceSpec is a disk as a toolstack declares it in xenstore.
type DeviceSpec struct {
	Key    Key
	Name   string // names the export and the status; "" derives one
	Format string // normalised format name
	Path   string // absolute image path
	Mode   string // "r" or "w"
	Vdev   string // the device name as the guest knows it, e.g. "xvdb"
	Source string // "yaml" or "attach": who declared it
	// NBDDevice, for a domain-0 disk, is a kernel nbd device (/dev/nbdN)
	// the daemon connects to the export, so dom0 sees a block device.
	NBDDevice string
}

// Params is the backend's params key for the spec, as libxl writes it.
func (s DeviceSpec) Params() string {
	if s.Format == "raw" {
		return "aio:" + s.Path // what libxl writes for raw tap disks
	}
	return s.Format + ":" + s.Path
}

// Status keys the daemon writes under each backend directory.
const (
	statusDir      = "blktap"
	keyName        = statusDir + "/name"
	keySource      = statusDir + "/source"
	keyPhase       = statusDir + "/phase"
	keyError       = statusDir + "/error"
	keyExport      = statusDir + "/export"
	keyWorkerPid   = statusDir + "/worker-pid"
	keyRestarts    = statusDir + "/restarts"
	keyImageFormat = statusDir + "/format"
	keyImagePath   = statusDir + "/image"
	keyNBDDevice   = statusDir + "/nbd-device"
)

// Phases a device goes through, as `blktap ls` shows them.
const (
	PhaseStarting   = "starting"
	PhaseWaiting    = "waiting-frontend"
	PhaseConnected  = "connected"
	PhaseClosing    = "closing"
	PhaseClosed     = "closed"
	PhaseFailed     = "failed"
	PhaseRetrying   = "retrying"
	PhaseRestarting = "restarting"
	PhasePaused     = "paused"
)

// ErrExists reports a device that is already declared.
var ErrExists = errors.New("device already exists")

// SelfDomid is the domain the xenstore connection belongs to: the backend
// domain of every device this host serves (0 in dom0, N in a driver
// domain). It reads the connection's own "domid" key (a relative path, so
// under its home /local/domain/<self>); without one it is 0.
func SelfDomid(ctx context.Context, xs *xenstore.Client) uint32 {
	v, err := xs.Read(ctx, "domid")
	if err != nil {
		return 0
	}
	n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 32)
	if err != nil || n >= 0x7ff0 { // DOMID_FIRST_RESERVED
		return 0
	}
	return uint32(n)
}

// WriteDevice declares a disk the way libxl does for a tap disk (docs/WIRE.md,
// "Toolstack keys"): the backend directory under backend/vbd3 (or the key's kind)
// and the frontend directory, both in state Initialising, in one
// transaction, with libxl's permissions.
func WriteDevice(ctx context.Context, xs *xenstore.Client, spec DeviceSpec) error {
	self := SelfDomid(ctx, xs)
	be := spec.Key.BackendPath(self)
	fe := spec.Key.FrontendPath()
	return xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		if _, err := tx.Read(ctx, be); err == nil {
			return fmt.Errorf("%w: %s", ErrExists, be)
		} else if !errors.Is(err, xenstore.ErrNotFound) {
			return err
		}
		// libxl: the backend belongs to its domain and the guest may read
		// it; the frontend belongs to the guest and the backend domain may
		// read it. Set on the directories before the keys go in: a node
		// takes its parent's permissions when it is created.
		if err := txMkdirPerms(ctx, tx, be, []xenstore.Perm{
			{Domid: self, Access: xenstore.PermNone},
			{Domid: spec.Key.Domid, Access: xenstore.PermRead},
		}); err != nil {
			return err
		}
		if spec.Key.Domid != self {
			if err := txMkdirPerms(ctx, tx, fe, []xenstore.Perm{
				{Domid: spec.Key.Domid, Access: xenstore.PermNone},
				{Domid: self, Access: xenstore.PermRead},
			}); err != nil {
				return err
			}
		}
		if err := txWriteKeys(ctx, tx, be, backendKeys(spec, fe)); err != nil {
			return err
		}
		if err := txWriteKeys(ctx, tx, fe, frontendKeys(spec, be, self)); err != nil {
			return err
		}
		// blktap/ after the backend's permissions are set, under its own
		// locked directory: a node inherits its parent's permissions.
		if err := txMkdirPerms(ctx, tx, be+"/"+statusDir, statusPerms(self)); err != nil {
			return err
		}
		status := [][2]string{{keyName, spec.Name}, {keySource, spec.Source}}
		if spec.NBDDevice != "" {
			status = append(status, [2]string{keyNBDDevice, spec.NBDDevice})
		}
		return txWriteKeys(ctx, tx, be, status)
	})
}

// backendKeys are the keys libxl writes in a tap disk's backend directory.
func backendKeys(spec DeviceSpec, fe string) [][2]string {
	return [][2]string{
		{"frontend", fe},
		{"frontend-id", strconv.FormatUint(uint64(spec.Key.Domid), 10)},
		{"online", "1"},
		{"removable", "0"},
		{"bootable", "1"},
		{"state", strconv.Itoa(int(StateInitialising))},
		{"dev", spec.Vdev},
		{"type", spec.Key.Kind},
		{"mode", spec.Mode},
		{"device-type", "disk"},
		{"discard-enable", "1"}, // libxl's default: the guest may discard
		{"specification", "xen"},
		{"params", spec.Params()},
		{"script", "/etc/xen/scripts/block-tap"},
	}
}

// frontendKeys are the keys libxl writes in the guest's frontend directory.
func frontendKeys(spec DeviceSpec, be string, self uint32) [][2]string {
	return [][2]string{
		{"backend", be},
		{"backend-id", strconv.FormatUint(uint64(self), 10)},
		{"state", strconv.Itoa(int(StateInitialising))},
		{"virtual-device", strconv.FormatUint(uint64(spec.Key.Devid), 10)},
		{"device-type", "disk"},
		{"trusted", "1"},
	}
}

func txMkdirPerms(ctx context.Context, tx *xenstore.Tx, dir string, perms []xenstore.Perm) error {
	if err := tx.Mkdir(ctx, dir); err != nil {
		return err
	}
	return tx.SetPerms(ctx, dir, perms)
}

// txWriteKeys writes each key, a path relative to dir, in order.
func txWriteKeys(ctx context.Context, tx *xenstore.Tx, dir string, kvs [][2]string) error {
	abs := make([][2]string, len(kvs))
	for i, kv := range kvs {
		abs[i] = [2]string{dir + "/" + kv[0], kv[1]}
	}
	// One round trip, not one per key: a YAML of many disks declares
	// them one after another (docs/PERFORMANCE.md, "Convergence").
	return tx.WriteMany(ctx, abs)
}

// ErrDeviceFailed: the daemon gave up on a device (phase failed, an error
// in blktap/error) or the device was removed, as opposed to a device still
// on its way when the wait ended.
var ErrDeviceFailed = errors.New("device failed")

// WaitConnected waits until the device's backend is Connected and the
// daemon says so (phase connected), and returns its export's NBD URI: the
// guest view for a guest played by the daemon, the export for domain 0. A
// real Xen guest's disk has no export (the guest sees it through its own
// blkfront): then the URI is "". It fails early with the daemon's reason,
// wrapping ErrDeviceFailed, when the device fails; when ctx ends first
// the error wraps ctx's, and ErrDeviceFailed too if the daemon reported an
// error meanwhile.
func WaitConnected(ctx context.Context, xs *xenstore.Client, key Key) (string, error) {
	be := key.BackendPath(SelfDomid(ctx, xs))
	w, err := xs.Watch(ctx, be, watchToken("wait-connected"))
	if err != nil {
		return "", err
	}
	defer w.Close()
	for {
		st, _ := xs.Read(ctx, be+"/state")
		phase, _ := xs.Read(ctx, be+"/"+keyPhase)
		export, _ := xs.Read(ctx, be+"/"+keyExport)
		// The daemon writes phase and export in one transaction, and a
		// guest it plays is connected only with its export: phase
		// connected without one is a real guest's disk.
		if ParseState(st) == StateConnected && phase == PhaseConnected && (export != "" || key.Domid != 0) {
			return export, nil
		}
		if phase == PhaseFailed {
			msg, _ := xs.Read(ctx, be+"/"+keyError)
			return "", fmt.Errorf("%w: %s: %s", ErrDeviceFailed, key, msg)
		}
		if _, err := xs.Read(ctx, be); errors.Is(err, xenstore.ErrNotFound) {
			return "", fmt.Errorf("%w: %s was removed", ErrDeviceFailed, key)
		}
		select {
		case <-ctx.Done():
			msg, _ := xs.Read(context.Background(), be+"/"+keyError)
			if msg != "" {
				return "", fmt.Errorf("%w: %s not connected (%s): %s (%w)", ErrDeviceFailed, key, phase, msg, ctx.Err())
			}
			return "", fmt.Errorf("device %s not connected (state %s, phase %q): %w", key, ParseState(st), phase, ctx.Err())
		case _, ok := <-w.Events():
			if !ok || !drainEvents(w) {
				return "", fmt.Errorf("xenstore connection lost while waiting for %s", key)
			}
		}
	}
}

// drainEvents takes the watch events already queued behind the one just
// received: the daemon writes a device's status keys in one transaction,
// an event each, and one look at the device answers them all (on a busy
// host each look is a round trip and a wait for the CPU). False: the
// watch ended.
func drainEvents(w *xenstore.Watch) bool {
	for {
		select {
		case _, ok := <-w.Events():
			if !ok {
				return false
			}
		default:
			return true
		}
	}
}

// Detach does what a toolstack does to unplug a disk: it sets online to 0
// and the backend to Closing, waits for the backend to reach Closed (the
// daemon drains, flushes and stops the worker on the way), then removes
// both directories.
func Detach(ctx context.Context, xs *xenstore.Client, key Key) error {
	be := key.BackendPath(SelfDomid(ctx, xs))
	if _, err := xs.Read(ctx, be); err != nil {
		if errors.Is(err, xenstore.ErrNotFound) {
			return fmt.Errorf("no device %s", key)
		}
		return err
	}
	fe, _ := xs.Read(ctx, be+"/frontend")
	w, err := xs.Watch(ctx, be, watchToken("detach"))
	if err != nil {
		return err
	}
	defer w.Close()
	if err := xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		// Removed meanwhile (another detach finished first): writing
		// online would declare a husk of a device again.
		if _, err := tx.Read(ctx, be); err != nil {
			return err
		}
		if err := tx.Write(ctx, be+"/online", "0"); err != nil {
			return err
		}
		st, _ := tx.Read(ctx, be+"/state")
		if s := ParseState(st); s != StateClosed && s != StateClosing {
			return tx.Write(ctx, be+"/state", strconv.Itoa(int(StateClosing)))
		}
		return nil
	}); err != nil {
		if errors.Is(err, xenstore.ErrNotFound) {
			return nil // detached by someone else: done all the same
		}
		return err
	}
	for {
		st, _ := xs.Read(ctx, be+"/state")
		phase, _ := xs.Read(ctx, be+"/"+keyPhase)
		if ParseState(st) == StateClosed && phase == PhaseClosed {
			break
		}
		if _, err := xs.Read(ctx, be); errors.Is(err, xenstore.ErrNotFound) {
			return nil // another detach of the device finished first
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("device %s did not close (state %s, phase %q): %w", key, ParseState(st), phase, ctx.Err())
		case _, ok := <-w.Events():
			if !ok || !drainEvents(w) {
				return fmt.Errorf("xenstore connection lost while detaching %s", key)
			}
		}
	}
	if err := xs.Rm(ctx, be); err != nil && !errors.Is(err, xenstore.ErrNotFound) {
		return err
	}
	if fe != "" {
		if err := xs.Rm(ctx, fe); err != nil && !errors.Is(err, xenstore.ErrNotFound) {
			return err
		}
	}
	return nil
}

var watchSeq atomic.Uint64

// watchToken makes a token no other watch of this process uses: xenstored
// refuses a second watch of one path with one token on a connection
// (EEXIST), so two waits on one device must not share theirs.
func watchToken(what string) string {
	return what + "-" + strconv.FormatUint(watchSeq.Add(1), 10)
}
