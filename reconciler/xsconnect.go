package reconciler

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/blktap-go/blktap/xenstore"
)

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
		if err := d.embedXenstore(ctx); err != nil {
			return err
		}
	}
	_, gntdev := os.Stat("/dev/xen/gntdev")
	d.localFrontend = d.embedded != nil || gntdev != nil
	d.offerPersistent = offerPersistent(d.opts.PersistentGrants, d.localFrontend, HostFacts{}, d.log)
	if err := os.WriteFile(filepath.Join(d.opts.StateDir, XenstorePathFile), []byte(d.xsPath+"\n"), 0o600); err != nil {
		return err
	}
	return nil
}

// embedXenstore serves a xenstored of the daemon's own, for hosts without
// Xen, with the tree a previous daemon saved.
func (d *Daemon) embedXenstore(ctx context.Context) error {
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
