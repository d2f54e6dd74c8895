package reconciler

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v4"

	"github.com/blktap-go/blktap/tapengine/worker"
	"github.com/blktap-go/blktap/xenstore"
)

// workersDir, in the state directory, holds each worker's adopt socket,
// named for its device: KIND-DOMID-DEVID.sock.
const workersDir = "workers"

func (d *Daemon) adoptPath(k Key) string {
	return filepath.Join(d.opts.StateDir, workersDir, fmt.Sprintf("%s-%d-%d.sock", k.Kind, k.Domid, k.Devid))
}

func keyFromAdoptName(name string) (Key, bool) {
	base, ok := strings.CutSuffix(name, ".sock")
	if !ok {
		return Key{}, false
	}
	parts := strings.Split(base, "-")
	if len(parts) != 3 {
		return Key{}, false
	}
	return parseBackendPath("/b", "/b/"+strings.Join(parts, "/"))
}

// adoptWorkers takes over the workers a previous daemon left running (it
// was killed, or upgraded): their disks never stopped serving. Each is
// checked against what xenstore declares on its first reconcile.
func (d *Daemon) adoptWorkers(ctx context.Context) {
	dir := filepath.Join(d.opts.StateDir, workersDir)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		k, ok := keyFromAdoptName(e.Name())
		path := filepath.Join(dir, e.Name())
		if !ok {
			continue
		}
		actx, cancel := context.WithTimeout(ctx, 3*time.Second)
		p, desc, err := worker.Adopt(actx, path)
		cancel()
		if err != nil {
			os.Remove(path) // nobody listens: a stale socket
			continue
		}
		log := d.log.With("device", k.String())
		dev := d.newDevice(k)
		dev.name, dev.worker.proc, dev.worker.adopted = desc.Name, p, desc
		dev.worker.readOnly, dev.worker.size = desc.ReadOnly, desc.Size
		dev.retry.workerRestart.started(time.Now(), 0)
		if desc.NBD {
			rep, fds, err := p.CallFDs(ctx, worker.Request{Op: worker.OpExportFD})
			_ = rep
			if err == nil && len(fds) == 1 {
				f := os.NewFile(uintptr(fds[0]), "export")
				ln, lerr := net.FileListener(f)
				f.Close()
				if lerr == nil {
					if ul, ok := ln.(*net.UnixListener); ok {
						ul.SetUnlinkOnClose(true) // ours again: removed when the disk goes
						dev.exp.exportURI = "nbd+unix:///?socket=" + ul.Addr().String()
					} else {
						dev.exp.exportURI = "nbd://" + ln.Addr().String() + "/"
					}
					dev.exp.export, dev.exp.exportServed = ln, true
				}
			}
		}
		// A local ring's frontend lived in the old daemon: Plan has the
		// worker let go of it (disconnect-stray-ring), and the guest
		// reconnects to a new one.
		dev.rings.ring, dev.worker.strayRing = keepAdoptedRing(desc), desc.Ring && !keepAdoptedRing(desc)
		dev.worker.ringWatch = d.watchRing(ctx, p, k, log)
		if dev.rings.ring && dev.worker.ringWatch != nil {
			// A fault from before the watch: the watch reports only new ones.
			noticeRingFaultAsk(dev, log)
		}
		d.mu.Lock()
		d.devices[k] = dev
		d.mu.Unlock()
		d.publish(dev)
		go func() {
			<-p.Done()
			d.q.Add(k)
		}()
		log.Info("adopted a running worker", "pid", p.Pid(), "image", desc.Path, "export", dev.exp.exportURI)
		d.q.Add(k)
	}
}

// keepAdoptedRing: a real guest's ring (the worker maps its grants) needs
// nothing from the daemon, so it goes on as it is; reconnecting it would
// stall the guest's I/O for no reason (0.6 s measured on real Xen).
// Workers that predate Describe.Transport say nothing: only the local
// frontend existed then.
func keepAdoptedRing(desc *worker.Describe) bool {
	return desc.Ring && desc.Transport == "xen"
}

// adoptWorker keeps an adopted worker that serves what xenstore declares
// for its device: the params are the ones it opened.
func (d *Daemon) adoptWorker(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	dev.worker.procParams, dev.worker.adopted = s.Params, nil
	log.Info("adopted worker kept: it serves what xenstore declares", "params", s.Params)
	return nil
}

// disconnectStrayRing has an adopted worker let go of a local ring whose
// frontend died with the previous daemon.
func (d *Daemon) disconnectStrayRing(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	if _, err := dev.worker.proc.Call(ctx, worker.Request{Op: worker.OpDisconnect}); err != nil {
		return err
	}
	dev.worker.strayRing = false
	return nil
}

// resetOrphanRing restarts the handshake of a guest whose local frontend
// is gone while xenstore still says Connected: the backend goes to Closed
// and the frontend back to Initialising, which is a frontend's request to
// reconnect (xenbus.h).
func (d *Daemon) resetOrphanRing(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	return d.xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		if err := requireDir(ctx, tx, d.backendPath(dev.key)); err != nil {
			return err
		}
		if err := tx.Write(ctx, d.backendPath(dev.key)+"/state", strconv.Itoa(int(StateClosed))); err != nil {
			return err
		}
		return tx.Write(ctx, s.fePath+"/state", strconv.Itoa(int(StateInitialising)))
	})
}

// newDevice makes the daemon's record of one device.
func (d *Daemon) newDevice(k Key) *device {
	bo := backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(500*time.Millisecond),
		backoff.WithMaxInterval(30*time.Second),
		backoff.WithMaxElapsedTime(0),
	)
	return &device{key: k, retry: retryState{bo: bo}, st: statusState{status: map[string]string{}}}
}
