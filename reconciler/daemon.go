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
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/blktap-go/blktap/config"
	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/tapengine/worker"
	"github.com/blktap-go/blktap/xenstore"
)

// Options configure the daemon.
type Options struct {
	StateDir     string // sockets, the embedded xenstored, default export sockets
	ConfigPath   string // the YAML desired state; "" for none
	XenstorePath string // a xenstored socket; "" finds a real one or embeds one
	Exe          string // the binary that runs workers (`Exe __worker`)
	ServeVBD     bool   // also serve backend/vbd (where no kernel blkback is)
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
}

// XenstorePathFile, in the state directory, names the xenstored socket the
// daemon uses, so the CLI finds the same one.
const XenstorePathFile = "xenstore.path"

// EmbeddedSocket is the embedded xenstored's socket in the state directory.
const EmbeddedSocket = "xenstored.sock"

// EmbeddedTree, in the state directory, is where the embedded xenstored
// keeps its tree, so that a restarted daemon finds the devices `blktap
// attach` declared. Saved at most treeSaveDelay after each change.
const EmbeddedTree = "xenstored.db"

const treeSaveDelay = 200 * time.Millisecond

// Daemon is one running `blktap run`.
type Daemon struct {
	opts     Options
	log      *slog.Logger
	xs       *xenstore.Client
	xsPath   string
	embedded *xenstore.Server
	// localFrontend: no Xen here, so the daemon plays every guest's blkfront.
	localFrontend bool
	self          uint32 // the backend domain: the daemon's own (a driver domain's, or 0)
	root          string // /local/domain/<self>/backend
	q             *queue

	mu        sync.Mutex
	devices   map[Key]*device
	desired   map[Key]config.Disk     // from YAML
	procs     map[Key]*worker.Process // running workers, for the API (devices are the reconcilers')
	paused    map[Key]bool
	conflicts map[Key]string     // YAML disks whose key another declaration holds
	decl      map[Key]*declQueue // changes of YAML devices' declarations (desired.go)
	imageErrs map[Key]string     // why a YAML disk's image could not be created
	retry     map[Key]bool       // YAML disks a reload asks to try again
	ports     uint32             // last local event-channel port handed out

	shutdown *shutdownState // a `blktap shutdown` (lifecycle.go)
}

// Run runs the daemon until ctx is done or SIGTERM/SIGINT arrives, then
// exits leaving every worker serving its disk for the next daemon to
// adopt; or until `blktap shutdown` asks it to flush and close every disk
// first (lifecycle.go).
func Run(ctx context.Context, opts Options) error {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.WorkerStderr == nil {
		opts.WorkerStderr = os.Stderr
	}
	if opts.Exe == "" {
		exe, err := os.Executable()
		if err != nil {
			return err
		}
		opts.Exe = exe
	}
	if err := os.MkdirAll(opts.StateDir, 0o700); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	d := &Daemon{
		opts:      opts,
		log:       opts.Logger,
		root:      "/local/domain/0/backend",
		q:         newQueue(),
		devices:   map[Key]*device{},
		desired:   map[Key]config.Disk{},
		procs:     map[Key]*worker.Process{},
		paused:    map[Key]bool{},
		conflicts: map[Key]string{},
		shutdown:  newShutdownState(),
	}
	sd := takeNotifySocket()
	// Read the YAML before touching anything: a wrong file is a clear
	// error at start, not a half-started daemon.
	var cfg *config.File
	if opts.ConfigPath != "" {
		var err error
		if cfg, err = config.Load(opts.ConfigPath); err != nil {
			return err
		}
	}
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
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	kinds := []string{KindVBD3, KindTap}
	if opts.ServeVBD || d.embedded != nil {
		kinds = append(kinds, KindVBD)
	}
	events := make(chan Key, 256)
	for _, kind := range kinds {
		w, err := d.xs.Watch(ctx, d.root+"/"+kind, "backend-"+kind)
		if err != nil {
			return fmt.Errorf("watch %s: %w", d.root+"/"+kind, err)
		}
		go d.forward(ctx, w, func(xenstore.Event) (Key, bool) { return Key{}, false }, events, kind)
	}
	d.watchReleaseDomain(ctx)

	// Workers a previous daemon left running keep their disks served;
	// take them over before declaring anything, so no image is opened
	// twice.
	d.adoptWorkers(ctx)
	if cfg != nil {
		d.applyConfig(ctx, cfg)
	}

	var wg sync.WaitGroup
	const reconcilers = 4
	for range reconcilers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				k, ok := d.q.Get()
				if !ok {
					return
				}
				d.reconcile(ctx, k)
				d.q.Done(k)
			}
		}()
	}

	stopAPI, err := d.serveAPI()
	if err != nil {
		return err
	}
	defer stopAPI()
	if opts.MetricsAddr != "" {
		stopMetrics, err := d.serveMetrics(opts.MetricsAddr)
		if err != nil {
			return err
		}
		defer stopMetrics()
	}

	if opts.ServeVBD && d.embedded == nil && !d.localFrontend && blkbackLoaded() {
		// vbd3 disks coexist with blkback; script=block-blktap ones cannot.
		d.log.Warn("xen-blkback is loaded: it binds every backend/vbd device, so disks with script=block-blktap will fail; " +
			"to serve them, unload and blacklist it (modprobe -r xen-blkback; echo 'blacklist xen-blkback' >/etc/modprobe.d/blktap.conf)")
	}
	d.log.Info("blktap daemon running", "state_dir", opts.StateDir, "xenstore", d.xsPath,
		"embedded_xenstored", d.embedded != nil, "local_frontend", d.localFrontend)
	var fileChanged <-chan struct{}
	if opts.ConfigPath != "" {
		if fileChanged, err = watchFile(ctx, opts.ConfigPath, 300*time.Millisecond); err != nil {
			d.log.Warn("not watching the YAML file (SIGHUP still reloads it)", "err", err)
		}
	}
	resync := time.NewTicker(5 * time.Second)
	defer resync.Stop()
	d.rescan(ctx)
	go func() {
		// Ready for systemd once every disk declared at start has
		// converged or has its error (Type=notify).
		if !waitConverged(ctx, d.q, readySettle, readyLimit) {
			if ctx.Err() != nil {
				return
			}
			d.log.Warn("some disks have not converged yet; telling systemd the daemon is ready anyway (see blktap ls)", "waited", readyLimit)
		}
		if err := sd.notify("READY=1"); err != nil {
			d.log.Error("telling systemd the daemon is ready", "err", err)
		}
	}()
	closeAll := false
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case sig := <-sigs:
			d.log.Info("exiting on signal; workers keep serving their disks (the next `blktap run` adopts them; `blktap shutdown` closes them)", "signal", sig.String())
			break loop
		case <-d.shutdown.requested:
			closeAll = true
			break loop
		case k := <-events:
			d.q.Add(k)
		case <-resync.C:
			d.rescan(ctx)
		case <-hup:
			if opts.ConfigPath != "" {
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
	sd.notify("STOPPING=1")
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
	if closeAll {
		d.log.Info("shutting down: flushing and closing every disk")
		d.shutdown.closed = d.shutdownAll()
		d.log.Info("every disk closed", "disks", d.shutdown.closed)
		close(d.shutdown.done)
	}
	return nil
}

// forward turns one watch's events into device keys.
func (d *Daemon) forward(ctx context.Context, w *xenstore.Watch, _ func(xenstore.Event) (Key, bool), out chan<- Key, what string) {
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-w.Events():
			if !ok {
				return
			}
			if ev.Overflow {
				d.rescan(ctx)
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
// daemon runs: the level-triggered safety net under watches.
func (d *Daemon) rescan(ctx context.Context) {
	kinds := []string{KindVBD3, KindTap}
	if d.opts.ServeVBD || d.embedded != nil {
		kinds = append(kinds, KindVBD)
	}
	for _, kind := range kinds {
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
					d.q.Add(k)
				}
			}
		}
	}
	d.mu.Lock()
	for k := range d.devices {
		d.q.Add(k)
	}
	d.mu.Unlock()
}

func (d *Daemon) connectXenstore(ctx context.Context) error {
	if f := ProbeHost(); f.Xen {
		return d.connectRealXenstore(ctx, f)
	}
	path := d.opts.XenstorePath
	if path == "" {
		if p := xenstore.DefaultPath(); p != "" {
			if st, err := os.Stat(p); err == nil && st.Mode()&os.ModeSocket != 0 {
				dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
				c, err := xenstore.Dial(dctx, p)
				cancel()
				if err == nil {
					d.xs, d.xsPath = c, p
				} else {
					d.log.Warn("xenstored socket present but not answering; embedding one", "path", p, "err", err)
				}
			}
		}
	} else {
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		c, err := xenstore.Dial(dctx, path)
		cancel()
		if err != nil {
			return fmt.Errorf("xenstore %s: %w", path, err)
		}
		d.xs, d.xsPath = c, path
	}
	if d.xs == nil {
		sock := filepath.Join(d.opts.StateDir, EmbeddedSocket)
		srv := xenstore.NewServer(d.log.With("component", "xenstored"))
		ln, err := listenUnix(sock, 0o600)
		if err != nil {
			return fmt.Errorf("embedded xenstored: %w", err)
		}
		// The socket is ours, so the saved tree is too.
		db := filepath.Join(d.opts.StateDir, EmbeddedTree)
		if ok, err := srv.LoadTree(db); err != nil {
			aside := db + ".damaged"
			if rerr := os.Rename(db, aside); rerr != nil {
				ln.Close()
				return fmt.Errorf("embedded xenstored: %w (and cannot move it aside: %v)", err, rerr)
			}
			d.log.Error("embedded xenstored: the saved tree is damaged; starting with a fresh one", "err", err, "kept_as", aside)
		} else if ok {
			d.log.Info("embedded xenstored: tree restored", "path", db)
		}
		srv.PersistTo(db, treeSaveDelay)
		go func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, xenstore.ErrServerClosed) {
				d.log.Error("embedded xenstored stopped", "err", err)
			}
		}()
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		c, err := xenstore.Dial(dctx, sock)
		cancel()
		if err != nil {
			srv.Close()
			return fmt.Errorf("embedded xenstored: %w", err)
		}
		d.xs, d.xsPath, d.embedded = c, sock, srv
		// What a booted Xen host has, so tools that look for dom0 find it.
		for _, kv := range [][2]string{
			{"/local/domain/0/name", "Domain-0"},
			{"/local/domain/0/domid", "0"},
			{"/local/domain/0/backend", ""},
			{"/tool", ""},
		} {
			if err := d.xs.Write(ctx, kv[0], kv[1]); err != nil {
				return fmt.Errorf("embedded xenstored: %w", err)
			}
		}
	}
	_, gntdev := os.Stat("/dev/xen/gntdev")
	d.localFrontend = d.embedded != nil || gntdev != nil
	if err := os.WriteFile(filepath.Join(d.opts.StateDir, XenstorePathFile), []byte(d.xsPath+"\n"), 0o600); err != nil {
		return err
	}
	return nil
}

func (d *Daemon) closeXenstore() {
	d.xs.Close()
	if d.embedded != nil {
		d.embedded.Close()
		os.Remove(filepath.Join(d.opts.StateDir, XenstorePathFile))
	}
}

// listenUnix listens on a unix socket at path, replacing a stale socket
// (never another kind of file), with the given mode.
func listenUnix(path string, mode os.FileMode) (*net.UnixListener, error) {
	if st, err := os.Lstat(path); err == nil {
		if st.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("%s is in use by another process", path)
		}
		os.Remove(path)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// applyConfig makes xenstore declare every YAML disk: it creates missing
// images, writes the devices the file adds and detaches those it dropped.
// Problems are logged per disk; one bad disk never stops the others.
func (d *Daemon) applyConfig(ctx context.Context, cfg *config.File) {
	want := map[Key]config.Disk{}
	for _, disk := range cfg.Disks {
		k := Key{Kind: KindVBD3, Domid: disk.Domain, Devid: disk.DevID}
		want[k] = disk
	}
	d.mu.Lock()
	old := d.desired
	d.desired = want
	d.mu.Unlock()

	keys := make([]Key, 0, len(want))
	for k := range want {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i].String() < keys[j].String() })
	for _, k := range keys {
		disk := want[k]
		log := d.log.With("disk", disk.Name)
		if err := ensureImage(disk); err != nil {
			log.Error("image", "err", err)
			// The device is still declared: its status then says why it
			// cannot start, where `blktap ls` shows it.
			d.setImageError(k, err.Error())
		} else {
			d.setImageError(k, "")
		}
		// A reload is the operator's word that something was fixed: a
		// disk that failed for good tries once more.
		d.setRetry(k)
		spec := yamlSpec(k, disk)
		prev, had := old[k]
		changed := had && (prev.Image != disk.Image || prev.Format != disk.Format || prev.Mode != disk.Mode)
		if changed || d.declaring(k) {
			// Image, format or mode changed: a controlled reconnect,
			// as a toolstack would do it (unplug, then plug anew); or
			// a change of this device is still running: this one
			// waits its turn.
			d.declare(ctx, k, declOp{spec: &spec, reconnect: changed})
			continue
		}
		err := WriteDevice(ctx, d.xs, spec)
		d.setConflict(k, "")
		if errors.Is(err, ErrExists) {
			if !had {
				// Declared already, by someone else (an attach, a
				// toolstack): both stand as they are and the device's
				// status says so; nothing is torn down.
				if why := d.declaredElsewhere(ctx, k, spec); why != "" {
					log.Error("device declared twice", "why", why)
					d.setConflict(k, why)
				}
			}
		} else if err != nil {
			log.Error("declare device in xenstore", "err", err)
			continue
		}
		d.q.Add(k)
	}
	for k, disk := range old {
		if _, still := want[k]; still {
			continue
		}
		d.setImageError(k, "")
		if d.conflict(k) != "" {
			// The YAML never owned this device: someone else declared it.
			d.setConflict(k, "")
			d.q.Add(k)
			continue
		}
		d.log.Info("disk removed from the desired state: detaching", "disk", disk.Name)
		d.declare(ctx, k, declOp{})
	}
}

// yamlSpec is how a YAML disk is declared in xenstore.
func yamlSpec(k Key, disk config.Disk) DeviceSpec {
	return DeviceSpec{
		Key: k, Name: disk.Name, Format: disk.Format, Path: disk.Image,
		Mode: disk.Mode, Vdev: config.VdevName(disk.DevID), Source: "yaml",
	}
}

// reload reads the YAML file again and applies it, unless it cannot be
// read, is invalid, or would detach every disk without saying so; then
// the previous desired state stands, and the log and the daemon's status
// (ConfigErrorPath, shown by `blktap ls`) say why.
func (d *Daemon) reload(ctx context.Context, why string) {
	c, err := config.Load(d.opts.ConfigPath)
	if err == nil {
		d.mu.Lock()
		n := len(d.desired)
		d.mu.Unlock()
		err = c.CheckDropAll(n)
	}
	if err != nil {
		d.log.Error("reload refused: keeping the previous desired state", "trigger", why, "err", err)
		d.setConfigError(ctx, fmt.Sprintf("reload refused (%s, %s): %v", why, time.Now().UTC().Format(time.RFC3339), err))
		return
	}
	d.setConfigError(ctx, "")
	d.log.Info("reloaded the desired state", "trigger", why, "disks", len(c.Disks))
	d.applyConfig(ctx, c)
}

// ConfigErrorPath is where the daemon whose backend domain is self says
// why it refused the last version of its YAML file ("" or absent: it
// took it).
func ConfigErrorPath(self uint32) string {
	return xenstore.DomainPath(self) + "/" + statusDir + "/config-error"
}

func (d *Daemon) setConfigError(ctx context.Context, msg string) {
	p := ConfigErrorPath(d.self)
	err := d.xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		if msg == "" {
			if err := tx.Rm(ctx, p); err != nil && !errors.Is(err, xenstore.ErrNotFound) {
				return err
			}
			return nil
		}
		// It quotes the file's path and the parser's messages: the
		// backend domain's to read, as every blktap/ status.
		dir := path.Dir(p)
		if err := tx.Mkdir(ctx, dir); err != nil {
			return err
		}
		if err := tx.SetPerms(ctx, dir, statusPerms(d.self)); err != nil {
			return err
		}
		if len(msg) > maxStatusValue {
			msg = msg[:maxStatusValue]
		}
		return tx.Write(ctx, p, msg)
	})
	if err != nil {
		d.log.Warn("write the desired state's status", "err", err)
	}
}

// maxStatusValue keeps a status message well inside a xenstore value
// (4096 bytes).
const maxStatusValue = 2048

func (d *Daemon) setImageError(k Key, msg string) { d.setNote(&d.imageErrs, k, msg) }

// imageError is why the YAML's image for k could not be made, or "".
func (d *Daemon) imageError(k Key) string { return d.note(&d.imageErrs, k) }

// setNote records msg for k in *m, or forgets k's for "".
func (d *Daemon) setNote(m *map[Key]string, k Key, msg string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if msg == "" {
		delete(*m, k)
		return
	}
	if *m == nil {
		*m = map[Key]string{}
	}
	(*m)[k] = msg
}

func (d *Daemon) note(m *map[Key]string, k Key) string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return (*m)[k]
}

func (d *Daemon) setRetry(k Key) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.retry == nil {
		d.retry = map[Key]bool{}
	}
	d.retry[k] = true
}

// takeRetry reports, once, that k's disk should try again.
func (d *Daemon) takeRetry(k Key) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	r := d.retry[k]
	delete(d.retry, k)
	return r
}

// ensureImage creates a disk's image when it is missing and the YAML asks
// for it. An existing file is never touched.
func ensureImage(disk config.Disk) error {
	if disk.Format == "rbd" && disk.Create != nil {
		// The pool is the only judge of whether the image exists.
		err := formats.Create("rbd", disk.Image, formats.CreateOptions{Size: disk.Create.Size})
		if errors.Is(err, os.ErrExist) {
			return nil
		}
		return err
	}
	if !formats.IsFile(disk.Format) {
		return nil // a RAM disk is made on attach; nbd and rbd images are remote
	}
	if _, err := os.Stat(disk.Image); err == nil {
		return nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if disk.Create == nil {
		return fmt.Errorf("image %s does not exist (add create: {size: ...} to create it)", disk.Image)
	}
	if err := os.MkdirAll(filepath.Dir(disk.Image), 0o755); err != nil {
		return err
	}
	err := formats.Create(disk.Format, disk.Image, formats.CreateOptions{
		Size:          disk.Create.Size,
		Backing:       disk.Create.Backing,
		BackingFormat: disk.Create.BackingFormat,
	})
	if errors.Is(err, os.ErrExist) {
		return nil // created meanwhile by someone else: theirs stands
	}
	return err
}

// shutdownAll flushes and closes every disk and stops its worker; it
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

// declaredElsewhere says how the device xenstore already has at k differs
// from spec, or "" when it is the same disk.
func (d *Daemon) declaredElsewhere(ctx context.Context, k Key, spec DeviceSpec) string {
	be := d.backendPath(k)
	params, _ := d.xs.Read(ctx, be+"/params")
	mode, _ := d.xs.Read(ctx, be+"/mode")
	source, _ := d.xs.Read(ctx, be+"/"+keySource)
	format, path, err := ParseParams(params)
	if err == nil {
		format, err = formats.Normalize(format)
	}
	if err == nil && format == spec.Format && path == spec.Path && mode == spec.Mode {
		return ""
	}
	if source == "" {
		source = "a toolstack"
	}
	return fmt.Sprintf("declared twice: the YAML's disk %q (%s:%s %s) and %s's %s (mode %s); serving the latter",
		spec.Name, spec.Format, spec.Path, spec.Mode, source, params, mode)
}

// backendPath is k's backend directory under the daemon's own domain.
func (d *Daemon) backendPath(k Key) string { return k.BackendPath(d.self) }

func (d *Daemon) setConflict(k Key, why string) { d.setNote(&d.conflicts, k, why) }

func (d *Daemon) conflict(k Key) string { return d.note(&d.conflicts, k) }

func (d *Daemon) setProc(k Key, p *worker.Process) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if p == nil {
		delete(d.procs, k)
	} else {
		d.procs[k] = p
	}
}

func (d *Daemon) allocPort() uint32 {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.ports++
	return d.ports
}

func (d *Daemon) desiredFor(k Key) (config.Disk, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	disk, ok := d.desired[k]
	return disk, ok
}

func atoiDefault(s string, def int) int {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil {
		return def
	}
	return n
}
