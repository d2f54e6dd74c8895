package worker

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/tapengine/nbd"
)

// ListenerFile duplicates an export's listening socket, so that it can be
// handed to another process (a worker, or a daemon adopting one) and the
// export stays alive across either's restart.
func ListenerFile(ln net.Listener) (*os.File, error) {
	switch l := ln.(type) {
	case *net.UnixListener:
		return l.File()
	case *net.TCPListener:
		return l.File()
	}
	return nil, fmt.Errorf("listener %T cannot be handed over", ln)
}

// serveNBD serves the image as an NBD export on the listening socket the
// daemon passed; the export calls the image through the throttle like the
// ring does, so QoS and pause hold for both.
func (w *worker) serveNBD(req *Request, fds []int) Reply {
	if len(fds) != 1 {
		closeAll(fds)
		return fail(fmt.Errorf("%w: serve-nbd wants one listening socket, got %d descriptors", errInvalid, len(fds)))
	}
	if w.img == nil {
		closeAll(fds)
		return fail(fmt.Errorf("%w: no image open", errInvalid))
	}
	if w.nbdSrv != nil {
		closeAll(fds)
		return fail(fmt.Errorf("%w: already serving NBD", errInvalid))
	}
	var tlsConfig *tls.Config
	if req.TLSCert != "" {
		var err error
		if tlsConfig, err = nbd.LoadTLSConfig(req.TLSCert, req.TLSKey, req.TLSCA); err != nil {
			closeAll(fds)
			return fail(fmt.Errorf("%w: %v", errInvalid, err))
		}
	}
	f := os.NewFile(uintptr(fds[0]), "nbd-listener")
	ln, err := net.FileListener(f)
	f.Close()
	if err != nil {
		return fail(fmt.Errorf("nbd listener: %w", err))
	}
	w.nbdLn = ln
	srv := &nbd.Server{
		Export: nbd.Export{
			Name:        req.Name,
			Description: "blktap " + req.Name,
			Backend:     w.exportBackend(),
			ReadOnly:    w.readOnly,
			// A local file's writes never wait on a later request.
			InlineWrites: formats.IsFile(w.format),
			// Every rbd call is a round trip to the OSDs, and one in
			// flight parks a goroutine (librbd's aio): keep every request
			// the client sent in flight.
			RoundTrip: w.format == "rbd",
			Workers:   rbdWorkers(w.format),
		},
		Logger:    w.logger,
		TLSConfig: tlsConfig,
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ctx, ln); err != nil && ctx.Err() == nil {
			w.logger.Error("worker: nbd export stopped", "err", err)
		}
	}()
	w.nbdSrv, w.nbdCancel, w.nbdDone = srv, cancel, done
	return Reply{OK: true}
}

// exportBackend is what the export calls: startedIO when the image
// starts calls (rbd), so that a request in flight holds no goroutine,
// else the throttle.
func (w *worker) exportBackend() nbd.Backend {
	if startable(w.img.img) {
		return newStartedIO(w.io, w.img)
	}
	return w.io
}

// rbdWorkers: an rbd export runs as many requests at once as a
// connection may have in flight (nbd.Server's default MaxInFlight).
func rbdWorkers(format string) int {
	if format == "rbd" {
		return 64
	}
	return 0
}
