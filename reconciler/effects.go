package reconciler

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/frontend"
	"github.com/blktap-go/blktap/tapengine/worker"
	"github.com/blktap-go/blktap/xenstore"
)

// effect carries out one Action on a device: what it does to xenstore,
// the worker and the daemon's own halves. It decides nothing Plan did not;
// its error goes to the one retry policy (retryFailed), which tells a
// wait the effect asked for (retryAt), a terminal failure (terminal) and
// a step to retry with backoff apart.
type effect func(d *Daemon, ctx context.Context, dev *device, s snapshot, log *slog.Logger) error

// effects is indexed by ActionKind; every kind has one here or in
// waitEffects.
var effects = [...]effect{
	ActStartWorker:     (*Daemon).startWorker,
	ActServeExport:     (*Daemon).serveExport,
	ActBackendInitWait: (*Daemon).backendInitWait,
	ActDom0Connect:     (*Daemon).dom0Connect,
	ActFrontendInit:    (*Daemon).frontendInit,
	ActConnectRing:     (*Daemon).connectRingEffect,
	ActFrontendConnect: (*Daemon).frontendConnect,
	ActBackendClosing:  (*Daemon).backendClosing,
	ActFrontendClose:   (*Daemon).frontendClose,
	ActDisconnectRing:  (*Daemon).disconnectRing,
	ActStopWorker:      (*Daemon).stopWorkerEffect,
	ActFrontendFatal:   (*Daemon).frontendFatalEffect,
	ActAdoptWorker:     (*Daemon).adoptWorker,
	ActResetOrphanRing: (*Daemon).resetOrphanRing,
	ActApplyQoS:        (*Daemon).applyQoS,
	ActAttachKernelNBD: (*Daemon).connectKernelDevice,
	ActDetachKernelNBD: (*Daemon).detachKernelDevice,
	ActPause:           (*Daemon).pauseEffect,
	ActResume:          (*Daemon).resumeEffect,
	ActSnapshot:        (*Daemon).snapshotEffect,
	ActRefuseRequest:   (*Daemon).refuseRequest,
	// ActAwaitRestart, ActRestartWorker, ActAwaitFrontendRestart and
	// ActFrontendRestart: waitEffects.
	ActDisconnectStrayRing: (*Daemon).disconnectStrayRing,
}

func (d *Daemon) apply(ctx context.Context, dev *device, s snapshot, a Action, log *slog.Logger) error {
	if we := waitEffects[a.Kind]; we != nil {
		return we(d, ctx, dev, s, time.Duration(a.Wait), log)
	}
	if a.Kind <= 0 || int(a.Kind) >= len(effects) || effects[a.Kind] == nil {
		return fmt.Errorf("unknown action %v", a.Kind)
	}
	return effects[a.Kind](d, ctx, dev, s, log)
}

// serveExport hands the export listener to the worker; the toolstack finds it at physical-device-path.
func (d *Daemon) serveExport(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	be := d.backendPath(dev.key)
	if dev.exp.export == nil {
		ln, uri, err := d.listenExport(dev)
		if err != nil {
			return terminal(fmt.Errorf("export: %w", err))
		}
		dev.exp.export, dev.exp.exportURI = ln, uri
	}
	f, err := worker.ListenerFile(dev.exp.export)
	if err != nil {
		return err
	}
	defer f.Close()
	req := worker.Request{Op: worker.OpServeNBD, Name: dev.name}
	if disk, ok := d.desiredFor(dev.key); ok && disk.Export.TLSCert != "" {
		req.TLSCert, req.TLSKey, req.TLSCA = disk.Export.TLSCert, disk.Export.TLSKey, disk.Export.TLSCA
	}
	if _, err := dev.worker.proc.Call(ctx, req, int(f.Fd())); err != nil {
		return err
	}
	dev.exp.exportServed = true
	log.Info("export ready", "uri", dev.exp.exportURI)
	if dev.worker.readOnly && !s.Cdrom {
		// libxl refuses to build an HVM guest's device model
		// around a read-only emulated hard disk that has a local
		// path ("qemu-xen doesn't support read-only IDE disk
		// drivers"); without one the disk is PV-only.
		return nil
	}
	return d.publishDevicePath(ctx, dev.key, be, dev.exp.export)
}

// backendInitWait publishes the transport limits, then InitWait.
func (d *Daemon) backendInitWait(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	be := d.backendPath(dev.key)
	ro := s.Mode == "r" || s.Mode == "ro"
	err := d.xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		if err := requireDir(ctx, tx, be); err != nil {
			return err
		}
		if dev.st.feFatal != "" {
			// The frontend starts over: its last fatal error is history.
			if err := tx.Rm(ctx, d.errorNode(dev.key)); err != nil && !errors.Is(err, xenstore.ErrNotFound) {
				return err
			}
		}
		// Transport limits first (docs/WIRE.md, "blkif feature keys":
		// what blkback publishes at probe), then InitWait.
		probe, _ := worker.RingOptions(ro).Features()
		probe = append(probe,
			[2]string{"multi-queue-max-queues", strconv.Itoa(maxQueues())},
			[2]string{"state", strconv.Itoa(int(StateInitWait))})
		for _, kv := range probe {
			if err := tx.Write(ctx, be+"/"+kv[0], kv[1]); err != nil {
				return err
			}
		}
		return nil
	})
	if err == nil {
		dev.st.feFatal = ""
	}
	return err
}

// dom0Connect connects both halves of a domain-0 disk, whose frontend is its export.
func (d *Daemon) dom0Connect(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	be := d.backendPath(dev.key)
	return d.xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		if err := requireDir(ctx, tx, be); err != nil {
			return err
		}
		// The block-tap hotplug script's keys: tapback waits for them.
		// Where a hotplug script ran it wrote them already, and its
		// physical-device-path (block-tap's tap-ctl link to the same
		// export) stands.
		kv := append([][2]string{{"hotplug-status", "connected"}}, diskKeys(dev, s)...)
		kv = append(kv, [2]string{"state", strconv.Itoa(int(StateConnected))})
		for _, e := range kv {
			if err := tx.Write(ctx, be+"/"+e[0], e[1]); err != nil {
				return err
			}
		}
		if s.FrontendPresent {
			return tx.Write(ctx, s.fePath+"/state", strconv.Itoa(int(StateConnected)))
		}
		return nil
	})
}

// frontendInit allocates the local frontend's ring and publishes it, as a blkfront would.
func (d *Daemon) frontendInit(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	f, err := frontend.New(frontend.Options{Protocol: blkif.X86_64, MaxIndirectSegments: 256})
	if err != nil {
		return err
	}
	port := d.allocPort()
	refs := f.RingRefs()
	err = d.xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		if err := requireDir(ctx, tx, s.fePath); err != nil {
			return err
		}
		kv := [][2]string{
			{"event-channel", strconv.FormatUint(uint64(port), 10)},
			{"protocol", f.Protocol().String()},
		}
		if len(refs) == 1 {
			kv = append(kv, [2]string{"ring-ref", strconv.FormatUint(uint64(refs[0]), 10)})
		} else {
			order := 0
			for 1<<order < len(refs) {
				order++
			}
			kv = append(kv, [2]string{"ring-page-order", strconv.Itoa(order)})
			for i, r := range refs {
				kv = append(kv, [2]string{fmt.Sprintf("ring-ref%d", i), strconv.FormatUint(uint64(r), 10)})
			}
		}
		kv = append(kv, [2]string{"state", strconv.Itoa(int(StateInitialised))})
		for _, e := range kv {
			if err := tx.Write(ctx, s.fePath+"/"+e[0], e[1]); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		f.Close()
		return err
	}
	dev.rings.lf, dev.rings.lfPort = f, port
	k := dev.key
	go func() {
		<-f.Done()
		d.q.Add(k) // it may have given up on its own: look
	}()
	return nil
}

// frontendFatalEffect reports the frontend's unusable keys and closes the backend.
func (d *Daemon) frontendFatalEffect(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	return d.frontendFatal(ctx, dev, "frontend: "+s.FrontendError, log)
}

// connectRingEffect has the worker serve the ring, then publishes the disk and Connected.
func (d *Daemon) connectRingEffect(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	be := d.backendPath(dev.key)
	if !dev.rings.ring {
		if err := d.connectRing(ctx, dev, s); err != nil {
			return err
		}
	}
	if !s.LocalFrontend {
		// A real guest's disk is back once its ring is (a local
		// one's once its guest view is, at frontend-connect).
		dev.rings.ringLost = ""
	}
	return d.xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		if err := requireDir(ctx, tx, be); err != nil {
			return err
		}
		kv := append(diskKeys(dev, s), [2]string{"state", strconv.Itoa(int(StateConnected))})
		for _, e := range kv {
			if err := tx.Write(ctx, be+"/"+e[0], e[1]); err != nil {
				return err
			}
		}
		return nil
	})
}

// frontendConnect connects the local frontend and exports its guest view.
func (d *Daemon) frontendConnect(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	if dev.rings.lf == nil {
		return fmt.Errorf("local frontend missing")
	}
	sectors, ss := s.beSectors, s.beSectorSize
	if ss == 0 {
		ss = blkif.SectorSize
	}
	// A blkfront reads the backend's features before it connects.
	if err := dev.rings.lf.SetFeatures(frontend.Features{
		Discard:             s.beDiscard,
		MaxIndirectSegments: s.beMaxIndirect,
	}); err != nil {
		return err
	}
	if err := dev.rings.lf.Connect(sectors, ss, s.beInfo&4 != 0); err != nil {
		return err
	}
	if err := d.serveGuestView(dev, s.beInfo&4 != 0, log); err != nil {
		return err
	}
	err := d.xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		if err := requireDir(ctx, tx, s.fePath); err != nil {
			return err
		}
		return tx.Write(ctx, s.fePath+"/state", strconv.Itoa(int(StateConnected)))
	})
	if err == nil && dev.rings.ringLost != "" {
		log.Info("ring reconnected", "after", dev.rings.ringLost)
		dev.rings.ringLost = ""
	}
	return err
}

// backendClosing moves the backend to Closing.
func (d *Daemon) backendClosing(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	be := d.backendPath(dev.key)
	return d.writeIfPresent(ctx, be, "state", strconv.Itoa(int(StateClosing)))
}

// frontendClose tears down the daemon's frontend half and moves the frontend to Closed.
func (d *Daemon) frontendClose(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	dev.closeKernelDevice(log)
	dev.closeLocalFrontend(log)
	if s.FrontendPresent {
		return d.writeIfPresent(ctx, s.fePath, "state", strconv.Itoa(int(StateClosed)))
	}
	return nil
}

// disconnectRing has the worker drain and unmap the ring; the backend goes Closed.
func (d *Daemon) disconnectRing(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	be := d.backendPath(dev.key)
	if dev.rings.ring && dev.worker.proc != nil {
		if _, err := dev.worker.proc.Call(ctx, worker.Request{Op: worker.OpDisconnect}); err != nil {
			return err
		}
	}
	dev.rings.ring = false
	if dev.rings.ringErr != "" {
		// The ring it names is gone; what comes next is a new one,
		// after a pause that lets the status say why (and grows if
		// rings keep breaking: Plan decides it).
		dev.rings.ringLost, dev.rings.ringErr = dev.rings.ringErr, ""
		dev.retry.ringRestart.stopped(time.Now())
	}
	if s.Present {
		return d.writeIfPresent(ctx, be, "state", strconv.Itoa(int(StateClosed)))
	}
	return nil
}

// stopWorkerEffect drains, flushes and stops the worker.
func (d *Daemon) stopWorkerEffect(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	err := d.stopWorker(ctx, dev)
	dev.rings.ringErr, dev.rings.ringLost = "", ""
	return err
}

// applyQoS gives the worker the desired limits: live, no reconnect.
func (d *Daemon) applyQoS(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	want := s.QoS
	if _, err := dev.worker.proc.Call(ctx, worker.Request{Op: worker.OpQoS, IOPS: want.IOPS, Bandwidth: want.Bandwidth}); err != nil {
		return err
	}
	dev.ctl.qos = want
	log.Info("qos applied", "iops", want.IOPS, "bandwidth", want.Bandwidth)
	return nil
}

func (d *Daemon) startWorker(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	if d.embedded == nil && !d.localFrontend {
		if err := blkbackBound(dev.key); err != nil {
			return terminal(err)
		}
	}
	img, err := d.imageToOpen(dev.key, s)
	if err != nil {
		return err
	}
	// The worker gets a socket of its own on which a restarted daemon
	// adopts it; the path is the device's, under STATE/workers.
	adoptPath := d.adoptPath(dev.key)
	af, err := adoptSocket(adoptPath)
	if err != nil {
		return err
	}
	p, err := worker.StartAdoptable(d.opts.Exe, []string{"__worker", "--name", dev.name, "--adopt"}, d.opts.WorkerStderr, af)
	af.Close()
	if err != nil {
		os.Remove(adoptPath)
		return err
	}
	allow, err := d.allowDirs(ctx, dev.key, img.path)
	if err != nil {
		p.Kill()
		return err
	}
	var engine string // the YAML's, read at each start: a change applies at the next
	if disk, ok := d.desiredFor(dev.key); ok {
		engine = disk.IO
	}
	rep, err := p.Call(ctx, worker.Request{Op: worker.OpOpen, Name: dev.name, Format: img.format, Path: img.path, ReadOnly: img.readOnly, AllowDirs: allow, IO: engine})
	if err != nil {
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		p.Close(cctx)
		cancel()
		return err
	}
	dev.worker.proc, dev.worker.procParams, dev.worker.readOnly, dev.worker.size = p, s.Params, img.readOnly, rep.Size
	dev.ctl.qos, dev.ctl.paused, dev.worker.exited = QoS{}, false, "" // a new worker starts unlimited, serving
	dev.retry.workerRestart.started(time.Now(), 0)
	d.publish(dev)
	dev.rings.ringErr = ""
	k := dev.key
	dev.worker.ringWatch = d.watchRing(ctx, p, k, log)
	go func() {
		<-p.Done()
		d.q.Add(k)
	}()
	log.Info("worker started", "pid", p.Pid(), "format", img.format, "path", img.path, "size", rep.Size)
	return nil
}

// watchRing has the worker report its rings' faults as they happen, each
// requeueing the device; nil (the device then polls stats) for a worker
// that cannot.
func (d *Daemon) watchRing(ctx context.Context, p *worker.Process, k Key, log *slog.Logger) *worker.RingWatch {
	rw, err := p.WatchRing(ctx, func() { d.q.Add(k) })
	if err != nil {
		if !errors.Is(err, worker.ErrWatchUnsupported) {
			log.Warn("worker will not report ring faults; polling its stats", "err", err)
		}
		return nil
	}
	return rw
}

// image is what a worker opens.
type image struct {
	format, path string
	readOnly     bool
}

// imageToOpen checks what the device's params and mode ask the worker to
// open. An image that can never open as asked is a terminal error.
func (d *Daemon) imageToOpen(k Key, s snapshot) (image, error) {
	var img image
	noMedium := s.Cdrom && emptyMedium(s.Params)
	if strings.TrimSpace(s.Params) == "" && !noMedium {
		// libxl 4.17's block-attach writes params after the rest of
		// the backend directory: wait for it (its watch event requeues).
		return img, errors.New("no params yet")
	}
	if !noMedium {
		var err error
		if img.format, img.path, err = ParseParams(s.Params); err != nil {
			return img, terminal(err)
		}
		if img.format, err = formats.Normalize(img.format); err != nil {
			return img, terminal(err)
		}
	}
	if formats.IsFile(img.format) {
		if !filepath.IsAbs(img.path) {
			return img, terminal(fmt.Errorf("image path %q is not absolute", img.path))
		}
		if why := d.imageError(k); why != "" {
			if _, err := os.Stat(img.path); errors.Is(err, os.ErrNotExist) {
				// The YAML asked for the image and making it failed:
				// that is the reason to show, not "no such file".
				return img, terminal(errors.New(why))
			}
		}
	}
	if err := d.checkSource(img.format, img.path); err != nil {
		return img, terminal(err)
	}
	switch s.Mode {
	case "r", "ro":
		img.readOnly = true
	case "w", "rw", "":
	default:
		return img, terminal(fmt.Errorf("mode %q: want r or w", s.Mode))
	}
	img.readOnly = img.readOnly || noMedium
	return img, nil
}

// adoptSocket makes the listening socket a worker is adopted on, as a
// file to hand it.
func adoptSocket(path string) (*os.File, error) {
	os.Remove(path)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	aln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("adopt socket: %w", err)
	}
	aln.SetUnlinkOnClose(false)
	af, err := aln.File()
	aln.Close()
	return af, err
}

func (d *Daemon) connectRing(ctx context.Context, dev *device, s snapshot) error {
	if dev.worker.ringWatch != nil {
		dev.worker.ringWatch.Take() // a fault reported before is not this ring's
	}
	if !s.LocalFrontend {
		// A real guest on Xen: the worker maps its grants itself, one
		// ring per queue.
		queues := s.queues
		if len(queues) == 0 {
			queues = []queueRing{{refs: s.ringRefs, evtchn: s.eventChannel}}
		}
		for i, q := range queues {
			_, err := dev.worker.proc.Call(ctx, worker.Request{
				Op: worker.OpConnect, Transport: "xen", Protocol: s.protocol, Queue: i,
				RingRefs: q.refs, RingOrder: s.ringOrder, Domid: dev.key.Domid,
				EventChannel: q.evtchn, Persistent: s.fePersistent && s.offerPersistent,
			})
			if err != nil {
				if i > 0 {
					dev.worker.proc.Call(ctx, worker.Request{Op: worker.OpDisconnect})
				}
				return err
			}
		}
		dev.rings.ring = true
		return nil
	}
	if len(s.queues) > 0 {
		return terminal(fmt.Errorf("the local frontend serves one queue, the frontend asks for %d", len(s.queues)))
	}
	if dev.rings.lf == nil || s.eventChannel != dev.rings.lfPort {
		return fmt.Errorf("event channel %d is not bound to this device's local frontend", s.eventChannel)
	}
	want := dev.rings.lf.RingRefs()
	if fmt.Sprint(want) != fmt.Sprint(s.ringRefs) {
		return terminal(fmt.Errorf("frontend ring refs %v were not granted by the local frontend (%v)", s.ringRefs, want))
	}
	mem, kick, notify := dev.rings.lf.BackendFDs()
	_, err := dev.worker.proc.Call(ctx, worker.Request{
		Op:        worker.OpConnect,
		Transport: "local",
		Protocol:  s.protocol,
		RingRefs:  s.ringRefs,
		RingOrder: s.ringOrder,
	}, mem, kick, notify)
	if err != nil {
		return err
	}
	dev.rings.ring = true
	return nil
}

// stopWorker closes the worker, which drains and flushes, and drops it
// with its export.
func (d *Daemon) stopWorker(ctx context.Context, dev *device) error {
	dev.worker.stopping = true
	err := dev.worker.proc.Close(ctx)
	<-dev.worker.proc.Done()
	d.dropWorker(dev, true)
	return err
}

// dropWorker forgets a worker that has exited: nothing it served is
// served any more, and no later daemon adopts it. closeExport closes the
// export's listener too; after a crash it stays, so the restarted worker
// serves the address clients and physical-device-path already know.
func (d *Daemon) dropWorker(dev *device, closeExport bool) {
	os.Remove(d.adoptPath(dev.key))
	dev.worker.proc, dev.worker.ringWatch, dev.exp.exportServed, dev.rings.ring, dev.worker.stopping = nil, nil, false, false, false
	dev.worker.adopted, dev.ctl.paused, dev.worker.strayRing = nil, false, false
	d.publish(dev)
	if closeExport && dev.exp.export != nil {
		dev.exp.export.Close()
		dev.exp.export = nil
	}
}
