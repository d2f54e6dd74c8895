// Package reconciler is the daemon: it converges the real tap devices to
// what xenstore (a toolstack, `blktap attach`) and the YAML file declare.
//
// The loop is level-triggered (docs/ARCHITECTURE.md, section "Level-triggered reconcile"): watch events and file changes
// only name a device key; a reconcile of that key observes xenstore and the
// running worker afresh, asks the pure Plan for the next steps, applies
// them, and repeats until the plan is empty. Keys are queued, never events,
// so spurious and merged watch events cost one extra observation and
// nothing else. Each key is reconciled by one goroutine at a time, errors
// are retried with per-device exponential backoff, and terminal errors (bad
// params, a corrupt or missing image) stop retries until the device's
// params change.
//
// The daemon runs both halves of every XenbusState handshake it owns: the
// backend's for every device, and the frontend's where the daemon plays
// the guest (domain-0 disks, whose frontend is the NBD export, and guests
// on a machine without Xen, played by the local frontend). On a Xen host
// (ProbeHost) it plays no frontend and embeds no xenstored, and the
// backend domain is its own (SelfDomid), so it also runs in a driver
// domain.
//
// With a real toolstack (docs/WIRE.md, section "Real Xen hosts"):
//  1. A device whose backend names a `script` and has no blktap/source
//     (libxl's) reaches InitWait, even when its image cannot be opened;
//     libxl then runs the hotplug script, which waits for blktap/phase:
//     waiting-frontend or connected means served, failed means refused,
//     with the reason in blktap/error.
//  2. Such a device goes Connected only after hotplug-status=connected.
//  3. A frontend that disappears or goes Unknown after connect is Closed:
//     the ring is unmapped; the daemon's own disks also stop their worker.
//  4. Unusable ring keys from the frontend put the backend in Closing, the
//     reason in <home>/error/<backend path>/error (as xenbus_dev_fatal).
//
// The blktap/ status subtree is readable by the backend domain only.
package reconciler

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/blktap-go/blktap/config"
	"github.com/blktap-go/blktap/xenstore"
)

// Options configure the daemon.
type Options struct {
	StateDir     string // sockets, the embedded xenstored, default export sockets
	ConfigPath   string // the YAML desired state; "" for none
	XenstorePath string // a xenstored socket; "" finds a real one or embeds one
	Exe          string // the binary that runs workers (`Exe __worker`)
	ServeVBD     bool   // also serve backend/vbd (where no kernel blkback is)
	// PersistentGrants: when backends offer feature-persistent; "" is
	// auto, only where grant copy is missing (grants.go).
	PersistentGrants PersistentGrants
	// ImageDirs are where images (and their backing files) may live,
	// besides the state directory and the YAML images' directories.
	ImageDirs []string
	// NBDAllow lists the NBD servers nbd: sources may name besides unix
	// sockets in the image directories (CheckNBDAllow has the forms).
	NBDAllow []string
	// RBDAllow lists the pools rbd: sources may name besides the YAML's
	// rbd disks' (ParseRBDAllow has the form).
	RBDAllow []RBDRule
	// RAMMax caps the size of a RAM disk created on attach, in bytes;
	// 0 is DefaultRAMMax.
	RAMMax int64
	// MetricsAddr, if set, serves Prometheus metrics at http://ADDR/metrics.
	MetricsAddr  string
	Logger       *slog.Logger
	WorkerStderr io.Writer // where workers log; default os.Stderr

	hooks *hooks // the in-process harness's (hooks.go); nil otherwise
	// Version and Commit label blktap_build_info.
	Version string
	Commit  string
}

// Daemon is one running `blktap run`.
type Daemon struct {
	opts     Options
	log      *slog.Logger
	xs       *xenstore.Client
	xsPath   string
	embedded *xenstore.Server
	// localFrontend: no Xen here, so the daemon plays every guest's blkfront.
	localFrontend bool
	// offerPersistent: connecting backends publish feature-persistent
	// (decided once at start, grants.go).
	offerPersistent bool
	self            uint32 // the backend domain: the daemon's own (a driver domain's, or 0)
	root            string // /local/domain/<self>/backend
	q               *queue

	mu      sync.Mutex
	devices map[Key]*device
	desired map[Key]config.Disk // from YAML
	// desiredDirs are the directories of desired's image files, each once.
	desiredDirs []string
	views       map[Key]deviceView   // what the API sees of each device (devices are the reconcilers')
	requests    map[Key][]*opRequest // operators' requests, oldest first (requests.go)
	conflicts   map[Key]string       // YAML disks whose key another declaration holds
	decl        map[Key]*declQueue   // changes of YAML devices' declarations (desired.go)
	imageErrs   map[Key]string       // why a YAML disk's image could not be created
	retry       map[Key]bool         // YAML disks a reload asks to try again
	ports       uint32               // last local event-channel port handed out
	rows        map[Key]deviceRow    // what the metrics show of each device (metrics.go)

	shutdown *shutdownState // a `blktap shutdown` (lifecycle.go)
}

// Run runs the daemon until ctx is done or SIGTERM/SIGINT arrives, then
// exits leaving every worker serving its disk for the next daemon to
// adopt; or until `blktap shutdown` asks it to flush and close every disk
// first (lifecycle.go).
func Run(ctx context.Context, opts Options) error {
	d, cfg, err := newDaemon(opts)
	if err != nil {
		return err
	}
	sd := takeNotifySocket()
	if err := d.connectXenstore(ctx); err != nil {
		return err
	}
	defer d.closeXenstore()
	d.self = SelfDomid(ctx, d.xs)
	d.root = xenstore.DomainPath(d.self) + "/backend"

	// A signal ends the main loop, not ctx: the reconciles in flight
	// finish before the daemon exits (ctx is cancelled only if they hang).
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var sig signals
	sig.start()
	defer sig.stop()
	events, err := d.watchBackends(ctx)
	if err != nil {
		return err
	}
	// Workers a previous daemon left running keep their disks served;
	// take them over before declaring anything, so no image is opened
	// twice.
	d.adoptWorkers(ctx)
	if cfg != nil {
		d.applyConfig(ctx, cfg)
	}
	wg := d.startReconcilers(ctx)
	stop, err := d.serveEndpoints()
	if err != nil {
		return err
	}
	defer stop()
	d.warnBlkback()
	d.log.Info("blktap daemon running", "state_dir", opts.StateDir, "xenstore", d.xsPath,
		"embedded_xenstored", d.embedded != nil, "local_frontend", d.localFrontend)
	d.rescan(ctx, d.q.Add)
	go d.notifyReady(ctx, sd)
	opts.hooks.running(d)
	closeAll := d.mainLoop(ctx, events, &sig)
	sd.notify("STOPPING=1")
	d.drain(wg, cancel)
	if closeAll {
		d.log.Info("shutting down: flushing and closing every disk")
		d.shutdown.closed = d.shutdownAll()
		d.log.Info("every disk closed", "disks", d.shutdown.closed)
		close(d.shutdown.done)
	}
	return nil
}

// newDaemon fills in the options' defaults and reads the YAML before
// touching anything: a wrong file is a clear error at start, not a
// half-started daemon.
func newDaemon(opts Options) (*Daemon, *config.File, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.WorkerStderr == nil {
		opts.WorkerStderr = os.Stderr
	}
	if opts.Exe == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, nil, err
		}
		opts.Exe = exe
	}
	if err := os.MkdirAll(opts.StateDir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("state directory: %w", err)
	}
	d := emptyDaemon(opts, opts.Logger)
	d.shutdown = newShutdownState()
	var cfg *config.File
	if opts.ConfigPath != "" {
		var err error
		if cfg, err = config.Load(opts.ConfigPath); err != nil {
			return nil, nil, err
		}
	}
	return d, cfg, nil
}

// signals are the ones the main loop answers.
type signals struct{ term, hup chan os.Signal }

func (s *signals) start() {
	s.term, s.hup = make(chan os.Signal, 1), make(chan os.Signal, 1)
	signal.Notify(s.term, syscall.SIGTERM, syscall.SIGINT)
	signal.Notify(s.hup, syscall.SIGHUP)
}

func (s *signals) stop() {
	signal.Stop(s.term)
	signal.Stop(s.hup)
}

// backendKinds are the backend directories the daemon serves.
func (d *Daemon) backendKinds() []string {
	kinds := []string{KindVBD3, KindTap}
	if d.opts.ServeVBD || d.embedded != nil {
		kinds = append(kinds, KindVBD)
	}
	return kinds
}

// watchBackends watches every backend directory the daemon serves; the
// channel carries the keys of the devices that changed.
func (d *Daemon) watchBackends(ctx context.Context) (<-chan Key, error) {
	events := make(chan Key, 256)
	for _, kind := range d.backendKinds() {
		w, err := d.xs.Watch(ctx, d.root+"/"+kind, "backend-"+kind)
		if err != nil {
			return nil, fmt.Errorf("watch %s: %w", d.root+"/"+kind, err)
		}
		go d.forward(ctx, w, events)
	}
	d.watchReleaseDomain(ctx)
	return events, nil
}

// emptyDaemon is a Daemon with its tables made and nothing started; the
// test rigs build theirs from it too.
func emptyDaemon(opts Options, log *slog.Logger) *Daemon {
	return &Daemon{
		opts:      opts,
		log:       log,
		root:      "/local/domain/0/backend",
		q:         newQueue(),
		devices:   map[Key]*device{},
		desired:   map[Key]config.Disk{},
		views:     map[Key]deviceView{},
		requests:  map[Key][]*opRequest{},
		conflicts: map[Key]string{},
	}
}

// reconcilers is how many devices are reconciled at once. A reconcile
// mostly waits: on xenstore round trips, and above all on a worker
// process starting, which a loaded host stretches from tens of
// milliseconds to hundreds while it costs the CPU a few; with four, a
// fleet's convergence took that latency N/4 times in a row
// (docs/PERFORMANCE.md, "Convergence").
const reconcilers = 32

func (d *Daemon) startReconcilers(ctx context.Context) *sync.WaitGroup {
	var wg sync.WaitGroup
	for range reconcilers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d.reconcileQueued(ctx)
		}()
	}
	return &wg
}

// reconcileQueued reconciles the devices the queue hands out, one at a
// time, until the queue is shut down.
func (d *Daemon) reconcileQueued(ctx context.Context) {
	for {
		k, ok := d.q.Get()
		if !ok {
			return
		}
		d.reconcile(ctx, k)
		d.q.Done(k)
	}
}

// serveEndpoints starts the API and, if asked for, the metrics.
func (d *Daemon) serveEndpoints() (stop func(), err error) {
	stopAPI, err := d.serveAPI()
	if err != nil {
		return nil, err
	}
	if d.opts.MetricsAddr == "" {
		return stopAPI, nil
	}
	stopMetrics, err := d.serveMetrics(d.opts.MetricsAddr)
	if err != nil {
		stopAPI()
		return nil, err
	}
	return func() { stopMetrics(); stopAPI() }, nil
}

func (d *Daemon) warnBlkback() {
	if d.opts.ServeVBD && d.embedded == nil && !d.localFrontend && blkbackLoaded() {
		// vbd3 disks coexist with blkback; script=block-blktap ones cannot.
		d.log.Warn("xen-blkback is loaded: it binds every backend/vbd device, so disks with script=block-blktap will fail; " +
			"to serve them, unload and blacklist it (modprobe -r xen-blkback; echo 'blacklist xen-blkback' >/etc/modprobe.d/blktap.conf)")
	}
}

// notifyReady tells systemd the daemon is ready once every disk declared
// at start has converged or has its error (Type=notify).
func (d *Daemon) notifyReady(ctx context.Context, sd notifier) {
	if !waitConverged(ctx, d.q, readySettle, readyLimit) {
		if ctx.Err() != nil {
			return
		}
		d.log.Warn("some disks have not converged yet; telling systemd the daemon is ready anyway (see blktap ls)", "waited", readyLimit)
	}
	if err := sd.notify("READY=1"); err != nil {
		d.log.Error("telling systemd the daemon is ready", "err", err)
	}
}

// resyncEvery is how often the daemon observes every device again, in
// case a watch event was lost. xenstored does not lose a connection's
// events (an overflow or a reconnect rescans at once), so this is only a
// safety net, and it is not free: a pass reads all of a device's keys,
// and in a Xen dom0 each request is a few system calls in the daemon and
// in xenstored. Every 5 s, the resync of three idle disks took a third of
// a TCG-emulated dom0's CPU (test/xen's per-scenario CPU report).
var resyncEvery = 30 * time.Second

// mainLoop feeds the queue until the daemon is to stop; closeAll: a
// `blktap shutdown` asked for every disk to be closed first.
func (d *Daemon) mainLoop(ctx context.Context, events <-chan Key, sig *signals) (closeAll bool) {
	var fileChanged <-chan struct{}
	if d.opts.ConfigPath != "" {
		var err error
		if fileChanged, err = watchFile(ctx, d.opts.ConfigPath, 300*time.Millisecond); err != nil {
			d.log.Warn("not watching the YAML file (SIGHUP still reloads it)", "err", err)
		}
	}
	resync := time.NewTicker(resyncEvery)
	defer resync.Stop()
	for {
		select {
		case <-ctx.Done():
			return false
		case s := <-sig.term:
			d.log.Info("exiting on signal; workers keep serving their disks (the next `blktap run` adopts them; `blktap shutdown` closes them)", "signal", s.String())
			return false
		case <-d.shutdown.requested:
			return true
		case k := <-events:
			d.q.Add(k)
		case <-resync.C:
			// After whatever watches asked for: a resync in the same
			// lane made convergence quadratic (queue.go).
			d.rescan(ctx, d.q.AddLow)
		case <-sig.hup:
			if d.opts.ConfigPath != "" {
				d.reload(ctx, "SIGHUP")
			}
		case _, ok := <-fileChanged:
			if !ok {
				fileChanged = nil
				continue
			}
			d.reload(ctx, "file changed")
		}
	}
}

// drain stops the queue and waits for the reconciles in flight, which
// are cancelled if they take more than 30 s.
func (d *Daemon) drain(wg *sync.WaitGroup, cancel context.CancelFunc) {
	d.q.Close()
	drained := make(chan struct{})
	go func() { wg.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(30 * time.Second):
		d.log.Warn("reconciles still running after 30s: cancelling them")
		cancel()
		<-drained
	}
}

// forward turns one watch's events into device keys.
func (d *Daemon) forward(ctx context.Context, w *xenstore.Watch, out chan<- Key) {
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-w.Events():
			if !ok {
				return
			}
			if ev.Overflow {
				d.rescan(ctx, d.q.Add)
				continue
			}
			if k, ok := parseBackendPath(d.root, ev.Path); ok {
				select {
				case out <- k:
				case <-ctx.Done():
					return
				}
			}
		}
	}
}

// rescan enqueues every device xenstore declares and every device the
// daemon runs: the level-triggered safety net under watches. Each key is
// enqueued once, after the scan: a key added while its pass runs is
// queued again, and the xenstore reads between two adds of one key let
// its first pass start, so every device was reconciled twice per rescan.
// add is the queue's lane the keys go to.
func (d *Daemon) rescan(ctx context.Context, add func(Key)) {
	keys := map[Key]struct{}{}
	for _, kind := range d.backendKinds() {
		doms, err := d.xs.Directory(ctx, d.root+"/"+kind)
		if err != nil {
			continue
		}
		for _, dom := range doms {
			devs, err := d.xs.Directory(ctx, d.root+"/"+kind+"/"+dom)
			if err != nil {
				continue
			}
			for _, dev := range devs {
				if k, ok := parseBackendPath(d.root, d.root+"/"+kind+"/"+dom+"/"+dev); ok {
					keys[k] = struct{}{}
				}
			}
		}
	}
	d.mu.Lock()
	for k := range d.devices {
		keys[k] = struct{}{}
	}
	d.mu.Unlock()
	for k := range keys {
		add(k)
	}
}

// returns how many disks it closed.
func (d *Daemon) shutdownAll() int {
	d.mu.Lock()
	devs := make([]*device, 0, len(d.devices))
	for _, dev := range d.devices {
		devs = append(devs, dev)
	}
	d.mu.Unlock()
	var wg sync.WaitGroup
	for _, dev := range devs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			dev.release(ctx, d.log)
			os.Remove(d.adoptPath(dev.key))
		}()
	}
	wg.Wait()
	return len(devs)
}

func (d *Daemon) backendPath(k Key) string { return k.BackendPath(d.self) }

func (d *Daemon) allocPort() uint32 {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.ports++
	return d.ports
}

func atoiDefault(s string, def int) int {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil {
		return def
	}
	return n
}
