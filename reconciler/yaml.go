package reconciler

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"time"

	"github.com/blktap-go/blktap/config"
	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/xenstore"
)

// applyConfig makes xenstore declare every YAML disk: it creates missing
// images, writes the devices the file adds and detaches those it dropped.
// Problems are logged per disk; one bad disk never stops the others.
func (d *Daemon) applyConfig(ctx context.Context, cfg *config.File) {
	want := map[Key]config.Disk{}
	for _, disk := range cfg.Disks {
		k := Key{Kind: KindVBD3, Domid: disk.Domain, Devid: disk.DevID}
		want[k] = disk
	}
	dirs := fileDirs(want)
	d.mu.Lock()
	old := d.desired
	d.desired = want
	d.desiredDirs = dirs
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
		if declaring := d.declaring(k); changed || declaring {
			// Image, format or mode changed: a controlled reconnect,
			// as a toolstack would do it (unplug, then plug anew); or
			// a change of this device is still running: this one
			// waits its turn, and reconnects if what xenstore declares
			// then differs. The version before this one says nothing
			// of that: the running change may declare another image.
			d.declare(ctx, k, declOp{spec: &spec, reconnect: changed || declaring})
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
		o := disk.Create.RBD
		err := formats.Create("rbd", disk.Image, formats.CreateOptions{
			Size: disk.Create.Size, ClusterSize: o.ObjectSize, Features: o.Features,
			StripeUnit: o.StripeUnit, StripeCount: o.StripeCount, DataPool: o.DataPool,
		})
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

func (d *Daemon) setConflict(k Key, why string) { d.setNote(&d.conflicts, k, why) }

func (d *Daemon) conflict(k Key) string { return d.note(&d.conflicts, k) }

func (d *Daemon) desiredFor(k Key) (config.Disk, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	disk, ok := d.desired[k]
	return disk, ok
}
