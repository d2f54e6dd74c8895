package reconciler

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/blktap-go/blktap/config"
	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/tapengine/worker"
	"github.com/blktap-go/blktap/xenstore"
)

// keyBackingDirs lists, in the backend directory, directories a device's
// backing chain may use besides its image's own (a snapshot's base).
const keyBackingDirs = statusDir + "/backing-dirs"

// pauseEffect holds the disk's I/O (ring and export alike) after what is
// in flight, flushes and closes the image.
func (d *Daemon) pauseEffect(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	return d.answer(dev, s, func(*opRequest) error {
		if _, err := dev.worker.proc.Call(ctx, worker.Request{Op: worker.OpPause}); err != nil {
			return err
		}
		dev.ctl.paused = true
		log.Info("device paused")
		return nil
	})
}

// resumeEffect reopens the disk's image, or switches it to the one named,
// and releases held I/O. A new image is recorded in the backend's params,
// so a restarted worker opens it too.
func (d *Daemon) resumeEffect(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	return d.answer(dev, s, func(r *opRequest) (err error) {
		req := worker.Request{Op: worker.OpResume}
		format, path := r.format, r.path
		if path != "" {
			if format, err = formats.Normalize(format); err != nil {
				return err
			}
			if err := d.checkSource(format, path); err != nil {
				return err
			}
			req.Format, req.Path = format, path
			if req.AllowDirs, err = d.allowDirs(ctx, dev.key, path); err != nil {
				return err
			}
		}
		if _, err := dev.worker.proc.Call(ctx, req); err != nil {
			return err
		}
		if path != "" {
			if err := d.setParams(ctx, dev, format, path, ""); err != nil {
				return err
			}
		}
		dev.ctl.paused = false
		log.Info("device resumed", "image", path)
		return nil
	})
}

// snapshotEffect makes the disk's current image the read-only base of a
// new overlay, live: pause, create the overlay over the image, resume on
// the overlay. On any failure the disk resumes on its old image.
func (d *Daemon) snapshotEffect(ctx context.Context, dev *device, s snapshot, log *slog.Logger) error {
	return d.answer(dev, s, func(r *opRequest) error {
		if format, base, err := ParseParams(s.Params); err == nil && format == "rbd" {
			return d.snapshotClone(ctx, dev, base, r, log)
		}
		format, base, baseFmt, err := d.snapshotPlan(r, s)
		if err != nil {
			return err
		}
		p := dev.worker.proc
		rep, err := p.Call(ctx, worker.Request{Op: worker.OpPause})
		if err != nil {
			return err
		}
		dev.ctl.paused = true
		resumeOld := func(cause error) error {
			if _, rerr := p.Call(context.WithoutCancel(ctx), worker.Request{Op: worker.OpResume}); rerr != nil {
				return fmt.Errorf("%w; and resuming on the old image failed: %v (the disk stays paused)", cause, rerr)
			}
			dev.ctl.paused = false
			return cause
		}
		overlay := r.path
		if err := formats.Create(format, overlay, formats.CreateOptions{
			Size: rep.Size, Backing: base, BackingFormat: baseFmt,
		}); err != nil {
			return resumeOld(fmt.Errorf("create overlay: %w", err))
		}
		extra := filepath.Dir(base)
		allow, err := d.allowDirs(ctx, dev.key, overlay, extra)
		if err != nil {
			os.Remove(overlay)
			return resumeOld(err)
		}
		if _, err := p.Call(ctx, worker.Request{Op: worker.OpResume, Format: format, Path: overlay, AllowDirs: allow}); err != nil {
			os.Remove(overlay)
			return resumeOld(fmt.Errorf("resume on the overlay: %w", err))
		}
		if err := d.setParams(ctx, dev, format, overlay, extra); err != nil {
			return err
		}
		dev.ctl.paused = false
		log.Info("device snapshotted", "base", base, "overlay", overlay)
		return nil
	})
}

// snapshotPlan checks a snapshot request against the device's params:
// the overlay's format, and the image it goes over.
func (d *Daemon) snapshotPlan(r *opRequest, s snapshot) (format, base, baseFmt string, err error) {
	format = r.format
	if format == "" {
		format = "qcow2"
	}
	if format, err = formats.Normalize(format); err != nil {
		return "", "", "", err
	}
	if !filepath.IsAbs(r.path) {
		return "", "", "", fmt.Errorf("snapshot file %q is not absolute", r.path)
	}
	if err := d.checkImageDir(r.path); err != nil {
		return "", "", "", err
	}
	baseFmt, base, err = ParseParams(s.Params)
	if err != nil {
		return "", "", "", err
	}
	if baseFmt, err = formats.Normalize(baseFmt); err != nil {
		return "", "", "", err
	}
	if !formats.IsFile(baseFmt) {
		return "", "", "", fmt.Errorf("%w: a %s disk has no image file to snapshot", formats.ErrUnsupported, baseFmt)
	}
	return format, base, baseFmt, nil
}

// allowDirs is where a device's backing chain may live: the allowed image
// directories, the directories recorded for the device (a snapshot's
// base), and extra.
func (d *Daemon) allowDirs(ctx context.Context, k Key, image string, extra ...string) ([]string, error) {
	dirs := d.imageDirs()
	rec, err := d.xs.Read(ctx, d.backendPath(k)+"/"+keyBackingDirs)
	if err != nil && !errors.Is(err, xenstore.ErrNotFound) {
		return nil, err
	}
	for _, s := range strings.Split(rec, ":") {
		if s != "" {
			dirs = append(dirs, s)
		}
	}
	return append(dirs, extra...), nil
}

// imageDirs are the directories images may come from (docs/ARCHITECTURE.md,
// "Trust"): the state directory, every --image-dir, and the directories of
// the images the YAML declares, each once. The list goes to every worker
// and is resolved on every check, so it must not grow with the disks that
// share a directory.
func (d *Daemon) imageDirs() []string {
	d.mu.Lock()
	yaml := d.desiredDirs
	d.mu.Unlock()
	return uniqueDirs(append(append([]string{d.opts.StateDir}, d.opts.ImageDirs...), yaml...))
}

// fileDirs are the directories of the disks' image files, each once.
func fileDirs(disks map[Key]config.Disk) []string {
	var dirs []string
	for _, disk := range disks {
		if formats.IsFile(disk.Format) {
			dirs = append(dirs, filepath.Dir(disk.Image))
		}
	}
	sort.Strings(dirs)
	return uniqueDirs(dirs)
}

// uniqueDirs drops repeats, keeping the first of each.
func uniqueDirs(dirs []string) []string {
	seen := make(map[string]bool, len(dirs))
	out := dirs[:0]
	for _, dir := range dirs {
		if !seen[dir] {
			seen[dir] = true
			out = append(out, dir)
		}
	}
	return out
}

// ErrImageDir reports an image outside the allowed image directories.
var ErrImageDir = errors.New("image outside the allowed image directories")

// checkImageDir refuses an image file outside imageDirs, symlinks
// resolved, so a toolstack (or a guest with write access to the wrong
// key) cannot make the daemon serve /etc/shadow.
func (d *Daemon) checkImageDir(path string) error {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			return err
		}
		real = filepath.Clean(path) // created later (a snapshot overlay)
		if dir, derr := filepath.EvalSymlinks(filepath.Dir(real)); derr == nil {
			real = filepath.Join(dir, filepath.Base(real))
		}
	}
	for _, dir := range d.imageDirs() {
		if rd, err := filepath.EvalSymlinks(dir); err == nil {
			dir = rd
		}
		dir = filepath.Clean(dir)
		if real == dir || strings.HasPrefix(real, dir+string(filepath.Separator)) || dir == "/" {
			return nil
		}
	}
	return fmt.Errorf("%w: %s (allowed: %s; add --image-dir to blktap run)", ErrImageDir, path, strings.Join(d.imageDirs(), ", "))
}

// setParams records the device's image in xenstore (and a directory its
// backing chain may use), and that its worker serves it: the params are
// the ones the worker opened, not a change to act on.
func (d *Daemon) setParams(ctx context.Context, dev *device, format, path, backingDir string) error {
	be := d.backendPath(dev.key)
	dev.worker.procParams = format + ":" + path
	return d.xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		if backingDir != "" {
			rec, err := tx.Read(ctx, be+"/"+keyBackingDirs)
			if err != nil && !errors.Is(err, xenstore.ErrNotFound) {
				return err
			}
			if !strings.Contains(":"+rec+":", ":"+backingDir+":") {
				if rec != "" {
					rec += ":"
				}
				if err := tx.Write(ctx, be+"/"+keyBackingDirs, rec+backingDir); err != nil {
					return err
				}
			}
		}
		return tx.Write(ctx, be+"/params", format+":"+path)
	})
}
