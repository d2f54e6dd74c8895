package reconciler

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"time"

	"github.com/blktap-go/blktap/tapengine/frontend"
	"github.com/blktap-go/blktap/tapengine/idle"
	"github.com/blktap-go/blktap/tapengine/nbd"
	"github.com/blktap-go/blktap/tapengine/nbdkernel"
	"github.com/blktap-go/blktap/xenstore"
)

// The ways a device's disk reaches its users besides the guest's ring:
// the NBD export (a worker's, or the guest view of a local frontend), the
// physical-device-path that names it for the toolstack, and the kernel
// nbd device a domain-0 disk may ask for.

// exportSpec is where a device's NBD export listens: the YAML's export
// settings, else STATE/NAME.sock.
func (d *Daemon) exportSpec(dev *device) (socket, tcp string) {
	if disk, ok := d.desiredFor(dev.key); ok {
		if disk.Export.TCP != "" {
			return "", disk.Export.TCP
		}
		if disk.Export.Socket != "" {
			return disk.Export.Socket, ""
		}
	}
	return filepath.Join(d.opts.StateDir, dev.name+".sock"), ""
}

func (d *Daemon) listenExport(dev *device) (net.Listener, string, error) {
	sock, tcp := d.exportSpec(dev)
	if tcp != "" {
		ln, err := net.Listen("tcp", tcp)
		if err != nil {
			return nil, "", err
		}
		scheme := "nbd"
		if disk, ok := d.desiredFor(dev.key); ok && disk.Export.TLSCert != "" {
			scheme = "nbds" // config refuses plain TCP unless the YAML says insecure
		}
		return ln, scheme + "://" + ln.Addr().String() + "/", nil
	}
	ln, err := listenUnix(sock, 0o600)
	if err != nil {
		return nil, "", err
	}
	return ln, "nbd+unix:///?socket=" + sock, nil
}

// publishDevicePath writes where libxl finds a local path to the disk
// (QEMU's emulated disk of an HVM guest): the export's socket, as libxl
// wants it for the key's backend kind. A hotplug script that wrote one
// (block-tap: its tap-ctl link to this same export) keeps it.
func (d *Daemon) publishDevicePath(ctx context.Context, k Key, be string, ln net.Listener) error {
	path := devicePath(k.Kind, exportSocket(ln))
	if path == "" {
		return nil
	}
	return d.xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		if err := requireDir(ctx, tx, be); err != nil {
			return err
		}
		if cur, _ := tx.Read(ctx, be+"/physical-device-path"); cur != "" {
			return nil
		}
		return tx.Write(ctx, be+"/physical-device-path", path)
	})
}

// devicePath is physical-device-path for an export's unix socket (none
// for a TCP export). A script-driven vbd disk's value goes to QEMU's
// file= unchanged, so it is the URI; libxl wraps a tap (vbd3) disk's value
// as nbd+unix:///?socket=VALUE itself, as tapdisk3 expects, and the 2006
// backend/tap has no reader but tools that take the socket the same way.
// libxl escapes nothing there: a comma would split QEMU's -drive option.
func devicePath(kind, sock string) string {
	switch {
	case sock == "" || strings.Contains(sock, ","):
		return ""
	case kind == KindVBD:
		return "nbd+unix:///?socket=" + sock
	}
	return sock
}

// exportSocket is the export's unix socket path, or "" for none or a TCP
// export: libxl turns physical-device-path into nbd+unix:///?socket=PATH
// for QEMU, so a "host:port" there would name a socket that does not exist.
func exportSocket(ln net.Listener) string {
	if ul, ok := ln.(*net.UnixListener); ok {
		return ul.Addr().String()
	}
	return ""
}

// The guest view's reader starts reads and writes on the ring and the
// frontend's reaper answers them (nbd.AsyncBackend).
var _ nbd.AsyncBackend = (*frontend.Frontend)(nil)

func (d *Daemon) serveGuestView(dev *device, readOnly bool, log *slog.Logger) error {
	ln, uri, err := d.listenExport(dev)
	if err != nil {
		return terminal(fmt.Errorf("guest view export: %w", err))
	}
	var tlsConfig *tls.Config
	if disk, ok := d.desiredFor(dev.key); ok && disk.Export.TLSCert != "" {
		if tlsConfig, err = nbd.LoadTLSConfig(disk.Export.TLSCert, disk.Export.TLSKey, disk.Export.TLSCA); err != nil {
			ln.Close()
			return terminal(fmt.Errorf("guest view export: %w", err))
		}
	}
	srv := &nbd.Server{
		TLSConfig: tlsConfig,
		Export: nbd.Export{
			RoundTrip:   true, // every read is a ring round trip: keep many in flight
			Name:        dev.name,
			Description: "blktap guest view " + dev.name,
			Backend:     dev.rings.lf,
			ReadOnly:    readOnly,
		},
		Logger: log,
		Bell:   new(idle.Doorbell), // the idle trimmer sleeps on it
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ctx, ln); err != nil && ctx.Err() == nil {
			log.Error("guest view export stopped", "err", err)
		}
	}()
	go trimGuestWhenIdle(ctx, srv, dev.rings.lf, log)
	dev.view.guest, dev.view.guestStop, dev.view.guestDone, dev.view.guestURI = srv, cancel, done, uri
	log.Info("guest view ready", "uri", uri)
	return nil
}

// connectKernelDevice connects the kernel nbd device a domain-0 disk asks
// for to its export, once the disk is connected.
func (d *Daemon) connectKernelDevice(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	ul, ok := dev.exp.export.(*net.UnixListener)
	if !ok {
		return fmt.Errorf("%s: the kernel nbd client needs a unix socket export", s.nbdDevice)
	}
	if err := nbdkernel.Available(s.nbdDevice); err != nil {
		return err
	}
	c, err := nbdkernel.Connect(ctx, s.nbdDevice, ul.Addr().String(), "")
	if err != nil {
		return err
	}
	dev.exp.kernel = c
	log.Info("kernel nbd device connected", "device", s.nbdDevice)
	return nil
}

// detachKernelDevice disconnects the kernel nbd device from the export.
func (d *Daemon) detachKernelDevice(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	dev.closeKernelDevice(log)
	return nil
}

func (dev *device) closeKernelDevice(log *slog.Logger) {
	if dev.exp.kernel == nil {
		return
	}
	if err := dev.exp.kernel.Disconnect(); err != nil {
		log.Warn("kernel nbd device disconnect", "err", err)
	}
	dev.exp.kernel.Wait()
	dev.exp.kernel = nil
}

// guestDrain bounds how long the guest view may take to answer what it
// has in flight before the local frontend is closed under it.
const guestDrain = 15 * time.Second

func (dev *device) closeLocalFrontend(log *slog.Logger) {
	if dev.view.guest != nil {
		dev.view.guestStop()
		closed := make(chan struct{})
		go func() {
			dev.view.guest.Close()
			close(closed)
		}()
		select {
		case <-closed:
		case <-time.After(guestDrain):
			// Its connections wait on ring requests nobody answers (a
			// worker stopped, dead or paused): closing the frontend fails
			// them, so the export, and the daemon's shutdown, end.
			log.Warn("guest view still busy: failing its ring requests", "after", guestDrain)
			if dev.rings.lf != nil {
				dev.rings.lf.CloseWithError(errors.New("guest view shut down with requests unanswered"))
			}
			<-closed
		}
		<-dev.view.guestDone
		dev.view.guest, dev.view.guestURI = nil, ""
	}
	if dev.rings.lf != nil {
		if err := dev.rings.lf.Close(); err != nil {
			log.Warn("local frontend close", "err", err)
		}
		dev.rings.lf = nil
	}
}
