package reconciler

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v4"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/frontend"
	"github.com/blktap-go/blktap/tapengine/nbd"
	"github.com/blktap-go/blktap/tapengine/nbdkernel"
	"github.com/blktap-go/blktap/tapengine/worker"
	"github.com/blktap-go/blktap/xenstore"
)

// device is what the daemon runs for one key. Only the goroutine that
// reconciles the key touches it (the queue guarantees one at a time), and
// shutdown, which runs after every reconciler stopped. Its state is kept
// by concern, one sub-struct each, so that an effect's reach shows.
type device struct {
	key  Key
	name string

	feWatch *xenstore.Watch // the frontend directory's watch (observe.go)
	fePath  string

	worker workerState // the worker process
	exp    exportState // the NBD export and the kernel nbd device on it
	rings  ringState   // the guest's ring, and the local frontend driving it
	view   guestView   // the local guest's view, exported over NBD
	ctl    ioControl   // what the operator and the YAML set: limits, pause
	st     statusState // errors and the status last written
	retry  retryState  // failed steps' backoff; restarts' facts
}

// workerState is the worker process and what it opened.
type workerState struct {
	proc       *worker.Process
	ringWatch  *worker.RingWatch // the worker's ring faults as they happen; nil: poll stats
	procParams string            // the params the worker opened
	readOnly   bool
	size       int64
	stopping   bool             // we asked the worker to exit
	adopted    *worker.Describe // set when a previous daemon started the worker, until checked
	// strayRing: the adopted worker serves a local ring whose frontend
	// lived in the previous daemon, until it lets go of it.
	strayRing bool
	exited    string // the last worker exited on its own: why (until a new one starts)
}

// exportState is the device's NBD export (domain 0's disk, or every
// disk on Xen for physical-device-path) and the kernel device on it.
type exportState struct {
	export       net.Listener // kept by the daemon, a dup handed to each worker
	exportURI    string
	exportServed bool
	kernel       *nbdkernel.Conn // the dom0 kernel nbd device connected to the export
}

// ringState is the guest's ring as the worker serves it and, without
// Xen, the local frontend that plays the guest's blkfront.
type ringState struct {
	ring    bool
	ringErr string
	// ringLost is the last ring error, kept once the ring is torn down
	// so the status says why the disk is away until it reconnects.
	ringLost string
	lf       *frontend.Frontend
	lfPort   uint32
}

// guestView is the local frontend's disk exported over NBD.
type guestView struct {
	guest     *nbd.Server
	guestStop context.CancelFunc
	guestDone chan struct{}
	guestURI  string
}

// ioControl is what the worker was told besides serving.
type ioControl struct {
	qos    QoS  // the limits the worker applies now
	paused bool // the worker holds I/O (the operator paused it)
}

// statusState is what went wrong and what the status says.
type statusState struct {
	failed       string // terminal error
	feFatal      string // the frontend's keys were unusable; cleared when the backend starts over
	statusLocked bool   // the blktap/ subtree's permissions are set (the guest cannot read it)
	statusFails  int    // status writes refused in a row (status.go)
	failedParams string
	lastErr      string
	stuckSince   time.Time         // first seen offline and Closed with no worker (desired.go)
	status       map[string]string // last status written, to write only changes
}

// retryState is when things are tried again: failed steps, and the
// facts Plan decides restarts from.
type retryState struct {
	bo            *backoff.ExponentialBackOff // retries of failed steps; reset on convergence
	restarts      int                         // workers that exited on their own
	workerRestart restartFacts
	restartDue    time.Time // a worker's restart waits until then (the status says restarting)
	ringRestart   restartFacts
}

func (d *Daemon) reconcile(ctx context.Context, k Key) {
	log := d.log.With("device", k.String())
	d.mu.Lock()
	dev := d.devices[k]
	if dev == nil {
		dev = d.newDevice(k)
		d.devices[k] = dev
	}
	d.mu.Unlock()
	defer func() {
		// A bug in one device's reconcile must not take the daemon down.
		if r := recover(); r != nil {
			log.Error("reconcile panicked", "panic", r)
			d.endPass(ctx, dev, nil, retryIn(5*time.Second), log)
		}
	}()
	for range maxRounds {
		snap, done, err := d.reconcileRound(ctx, dev, log)
		if !done {
			continue
		}
		d.endPass(ctx, dev, snap, err, log)
		if err == nil && snap != nil {
			d.settled(ctx, dev, *snap, log)
		}
		return
	}
	// Still moving: the rest waits for a later pass, so that one device
	// cannot keep a queue worker from the others.
	d.endPass(ctx, dev, nil, retryIn(time.Second), log)
}

// maxRounds bounds the observe-plan-apply rounds of one reconcile pass.
const maxRounds = 16

// reconcileRound observes the device, plans and applies the plan. done:
// this pass ends here, with the last observation (nil when there is
// none, or the device is not the daemon's) and what failed.
func (d *Daemon) reconcileRound(ctx context.Context, dev *device, log *slog.Logger) (last *snapshot, done bool, err error) {
	k := dev.key
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	snap, err := d.observe(sctx, dev)
	cancel()
	if err != nil {
		return nil, true, &stepError{step: stepObserve, err: err}
	}
	if k.Kind == KindVBD && snap.Present && !d.claimsVBD(snap) && dev.worker.proc == nil && dev.rings.lf == nil {
		// Kernel blkback's disk, not ours: no worker, no status.
		d.forget(dev)
		d.refuseAll(k, "is kernel blkback's, not blktap's")
		return nil, true, nil
	}
	d.foldObservation(dev, snap, log)
	d.observeRequests(dev, &snap)
	acts := Plan(snap.Observed, dev.actual(snap))
	if len(acts) == 0 {
		return &snap, true, nil
	}
	for _, a := range acts {
		log.Info("apply", "action", a.Kind.String(), "reason", a.Reason)
		actx, cancel := context.WithTimeout(ctx, actionTimeout(a.Kind))
		err := d.apply(actx, dev, snap, a, log)
		cancel()
		d.opts.hooks.applied(k, a, err)
		if err != nil {
			return &snap, true, &stepError{step: a.Kind.String(), action: true, err: err}
		}
	}
	dev.st.lastErr = ""
	return nil, false, nil
}

// foldObservation brings what the daemon holds for the device up to date
// with a new observation and with what happened since the last one (a
// worker or local frontend that stopped, a retry asked for).
func (d *Daemon) foldObservation(dev *device, snap snapshot, log *slog.Logger) {
	if snap.name != "" {
		dev.name = snap.name
	}
	if dev.name == "" {
		dev.name = fmt.Sprintf("d%d-%d", dev.key.Domid, dev.key.Devid)
	}
	d.noticeExit(dev, log)
	noticeFrontendGaveUp(dev, log)
	if dev.st.failed != "" && dev.st.failedParams != snap.Params {
		dev.st.failed, dev.st.failedParams = "", "" // params changed: try again
	}
	if d.takeRetry(dev.key) {
		dev.st.failed, dev.st.failedParams = "", ""
	}
}

// observeRequests adds to the observation what the daemon's own users
// ask of the device besides xenstore: the YAML's limits, the operator's
// oldest request.
func (d *Daemon) observeRequests(dev *device, snap *snapshot) {
	if disk, ok := d.desiredFor(dev.key); ok {
		snap.QoS = QoS{IOPS: disk.QoS.IOPS, Bandwidth: disk.QoS.Bandwidth}
	}
	snap.KernelNBD = snap.nbdDevice != ""
	snap.request = d.nextRequest(dev.key)
	if snap.request != nil {
		snap.Request = snap.request.kind
	}
}

// actionTimeout bounds one action's effect. An operator's request waits
// for the worker to drain and flush what is in flight, which takes longer
// on a loaded host.
func actionTimeout(k ActionKind) time.Duration {
	switch k {
	case ActPause, ActResume, ActSnapshot:
		return 2 * time.Minute
	}
	return 30 * time.Second
}

// settled follows a pass that left nothing to do, once its status is
// written.
func (d *Daemon) settled(ctx context.Context, dev *device, snap snapshot, log *slog.Logger) {
	if !snap.Present {
		d.forget(dev)
	}
	d.noticeStuck(ctx, dev, snap, log)
	dev.retry.bo.Reset()
}

func (dev *device) actual(s snapshot) Actual {
	a := Actual{
		Worker:      dev.worker.proc != nil,
		Export:      dev.exp.exportServed,
		Ring:        dev.rings.ring,
		RingError:   dev.rings.ringErr,
		RingLost:    dev.rings.ringLost,
		LF:          dev.rings.lf != nil,
		LFConnected: dev.view.guest != nil,
		Failed:      dev.st.failed,
		Params:      dev.worker.procParams,
		QoS:         dev.ctl.qos,
		KernelNBD:   dev.exp.kernel != nil,
		Paused:      dev.ctl.paused,
		Adopted:     adoption(dev, s),
		StrayRing:   dev.worker.strayRing,
		Exited:      dev.worker.exited,
	}
	now := time.Now()
	a.WorkerBackoff, a.RingBackoff = dev.retry.workerRestart.backoff(now), dev.retry.ringRestart.backoff(now)
	return a
}

// adoption compares what an adopted worker serves with what xenstore
// declares for its device.
func adoption(dev *device, s snapshot) Adoption {
	desc := dev.worker.adopted
	if desc == nil || !s.Present || dev.worker.proc == nil {
		return AdoptionNone // a removed device's worker stops anyway
	}
	format, path, err := ParseParams(s.Params)
	if err == nil {
		format, err = formats.Normalize(format)
	}
	ro := s.Mode == "r" || s.Mode == "ro"
	if err == nil && format == desc.Format && path == desc.Path && ro == desc.ReadOnly && desc.Open {
		return AdoptionMatches
	}
	return AdoptionStale
}

// noticeRingFault folds a ring that stopped on its own (a hostile
// frontend) into the ring error. The worker reports it through its ring
// watch as it happens, which requeues the device; only a worker that
// cannot (adopted from an older version) is asked, at every pass.
func noticeRingFault(dev *device, log *slog.Logger) {
	if dev.worker.ringWatch == nil {
		noticeRingFaultAsk(dev, log)
		return
	}
	setRingFault(dev, dev.worker.ringWatch.Take(), log)
}

// noticeRingFaultAsk asks the worker for its rings' fault.
func noticeRingFaultAsk(dev *device, log *slog.Logger) {
	setRingFault(dev, askRingFault(dev.worker.proc), log)
}

func setRingFault(dev *device, fault string, log *slog.Logger) {
	if fault != "" && dev.rings.ringErr == "" {
		dev.rings.ringErr = fault
		dev.rings.ring = false
		log.Error("ring stopped", "err", fault)
	}
}

// askRingFault asks a worker whether a ring of its stopped on its own.
func askRingFault(p *worker.Process) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rep, err := p.Call(ctx, worker.Request{Op: worker.OpStats})
	if err != nil {
		return ""
	}
	return rep.RingError
}

// noticeFrontendGaveUp turns a local frontend that stopped on its own (it
// found the ring broken: a response it never asked for, a producer index
// past its requests) into the device's ring error, which closes the device
// and, once closed, restarts the frontend. The daemon's own closes set
// dev.rings.lf to nil first, so a stopped frontend still held was not one.
func noticeFrontendGaveUp(dev *device, log *slog.Logger) {
	if dev.rings.lf == nil || dev.rings.ringErr != "" {
		return
	}
	select {
	case <-dev.rings.lf.Done():
	default:
		return
	}
	err := dev.rings.lf.Err()
	if err == nil {
		err = frontend.ErrClosed
	}
	dev.rings.ringErr = "local frontend gave up: " + err.Error()
	log.Error("local frontend stopped", "err", err)
}

// forget drops a device whose backend directory is gone and whose
// resources are all released.
func (d *Daemon) forget(dev *device) {
	if dev.worker.proc != nil || dev.rings.lf != nil || dev.view.guest != nil {
		return
	}
	if dev.feWatch != nil {
		dev.feWatch.Close()
	}
	if dev.exp.export != nil {
		dev.exp.export.Close()
	}
	d.mu.Lock()
	delete(d.devices, dev.key)
	delete(d.rows, dev.key)
	d.mu.Unlock()
}

// info bits (blkif.h).
const (
	vdiskCDROM    = 0x1
	vdiskReadOnly = 0x4
)

// diskKeys are what a backend publishes about the disk at connect.
func diskKeys(dev *device, s snapshot) [][2]string {
	info := 0
	if dev.worker.readOnly {
		info |= vdiskReadOnly
	}
	if s.Cdrom {
		info |= vdiskCDROM
	}
	opts := worker.RingOptions(dev.worker.readOnly)
	// The toolstack's discard-enable=0 (xl's no-discard) withdraws the
	// feature, as blkback does.
	opts.Discard = opts.Discard && s.discard
	opts.Persistent = s.offerPersistent
	_, features := opts.Features()
	return append(features, [][2]string{
		{"sectors", strconv.FormatInt(dev.worker.size/blkif.SectorSize, 10)},
		{"info", strconv.Itoa(info)},
		{"sector-size", strconv.Itoa(blkif.SectorSize)},
		{"physical-sector-size", strconv.Itoa(blkif.SectorSize)},
	}...)
}

func requireDir(ctx context.Context, tx *xenstore.Tx, p string) error {
	if _, err := tx.Read(ctx, p); err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	return nil
}

// writeIfPresent writes dir/key only while dir exists: a write would
// otherwise re-create a directory the toolstack just removed.
func (d *Daemon) writeIfPresent(ctx context.Context, dir, key, value string) error {
	return d.xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		if _, err := tx.Read(ctx, dir); err != nil {
			if errors.Is(err, xenstore.ErrNotFound) {
				return nil
			}
			return err
		}
		return tx.Write(ctx, dir+"/"+key, value)
	})
}

// release stops everything the device runs: guest view, ring, worker
// (which drains and flushes). Used at daemon shutdown.
func (dev *device) release(ctx context.Context, log *slog.Logger) {
	log = log.With("device", dev.key.String())
	dev.closeKernelDevice(log)
	dev.closeLocalFrontend(log)
	if dev.worker.proc != nil {
		dev.worker.stopping = true
		if err := dev.worker.proc.Close(ctx); err != nil {
			log.Error("worker close", "err", err)
		} else {
			log.Info("disk flushed and closed", "name", dev.name)
		}
		dev.worker.proc = nil
	}
	if dev.exp.export != nil {
		dev.exp.export.Close()
		dev.exp.export = nil
	}
}

// errorNode is where Linux xenbus_dev_fatal reports a device's fatal
// error: error/<backend path below the domain's home>/error, under the
// backend domain's home.
func (d *Daemon) errorNode(k Key) string {
	home := xenstore.DomainPath(d.self)
	rel := strings.TrimPrefix(d.backendPath(k), home+"/")
	return home + "/error/" + rel + "/error"
}

// maxFatal bounds a fatal message: it quotes what the guest wrote, and a
// xenstore value is at most 4096 bytes.
const maxFatal = 512

// frontendFatal does what xenbus_dev_fatal does for blkback: the reason
// goes where toolstacks look for it, and the backend goes Closing so the
// frontend gives up instead of waiting at InitWait for ever. The
// frontend's own keys are left alone.
func (d *Daemon) frontendFatal(ctx context.Context, dev *device, msg string, log *slog.Logger) error {
	if len(msg) > maxFatal {
		msg = msg[:maxFatal]
	}
	be := d.backendPath(dev.key)
	err := d.xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		if _, err := tx.Read(ctx, be); err != nil {
			if errors.Is(err, xenstore.ErrNotFound) {
				return nil // removed meanwhile: nobody to tell
			}
			return err
		}
		if err := tx.Write(ctx, d.errorNode(dev.key), msg); err != nil {
			return err
		}
		return tx.Write(ctx, be+"/state", strconv.Itoa(int(StateClosing)))
	})
	if err != nil {
		return err
	}
	dev.st.feFatal = msg
	log.Error("frontend error: backend closing", "err", msg)
	return nil
}
