package reconciler

import (
	"context"
	"errors"
	"log/slog"
	"strconv"
	"time"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/xenstore"
)

// statusNotes is what the status says of a device beyond its
// observation: what the daemon runs for it and what happened to it.
type statusNotes struct {
	worker       bool
	workerPid    int
	exportServed bool
	exportURI    string
	guestView    bool
	guestURI     string
	kernelDevice bool
	failed       string // terminal error
	feFatal      string
	lastErr      string
	ringErr      string
	ringLost     string
	restarting   bool // a worker restart waits out its backoff
	paused       bool
	conflict     string
	restarts     int
	name         string
	hadError     bool // the backend's error key was written
}

func (d *Daemon) statusNotes(dev *device) statusNotes {
	n := statusNotes{
		worker:       dev.worker.proc != nil,
		exportServed: dev.exp.exportServed,
		exportURI:    dev.exp.exportURI,
		guestView:    dev.view.guest != nil,
		guestURI:     dev.view.guestURI,
		kernelDevice: dev.exp.kernel != nil,
		failed:       dev.st.failed,
		feFatal:      dev.st.feFatal,
		lastErr:      dev.st.lastErr,
		ringErr:      dev.rings.ringErr,
		ringLost:     dev.rings.ringLost,
		restarting:   dev.worker.exited != "" && time.Now().Before(dev.retry.restartDue),
		paused:       dev.ctl.paused,
		conflict:     d.conflict(dev.key),
		restarts:     dev.retry.restarts,
		name:         dev.name,
	}
	if dev.worker.proc != nil {
		n.workerPid = dev.worker.proc.Pid()
	}
	_, n.hadError = dev.st.status["error"]
	return n
}

// statusPhase is the device's phase and the error its status shows.
func statusPhase(s snapshot, n statusNotes) (phase, errMsg string) {
	phase, errMsg = PhaseStarting, n.lastErr
	switch {
	case s.Backend == StateClosed && !n.worker:
		phase = PhaseClosed
		if n.failed != "" {
			errMsg = n.failed
		}
	case n.ringErr != "":
		phase, errMsg = PhaseClosing, "ring stopped: "+n.ringErr
	case n.feFatal != "":
		phase, errMsg = PhaseClosing, n.feFatal
	case s.Backend == StateClosing || s.Backend == StateClosed || !s.Online:
		phase = PhaseClosing
	case n.failed != "":
		phase, errMsg = PhaseFailed, n.failed
	case n.paused && n.worker:
		phase = PhasePaused
	case n.restarting:
		phase = PhaseRestarting
	case n.lastErr != "":
		phase = PhaseRetrying
	case s.Backend == StateConnected && (s.Domain0 || !s.LocalFrontend || n.guestView) &&
		(s.nbdDevice == "" || n.kernelDevice):
		phase = PhaseConnected
	case n.worker && (!s.Export || n.exportServed):
		// With its export, if it has one: the hotplug script reports
		// the device ready on this phase, and libxl hands the export's
		// physical-device-path to QEMU right after.
		phase = PhaseWaiting
	}
	if n.ringLost != "" && errMsg == "" {
		errMsg = "ring stopped: " + n.ringLost
	}
	if n.conflict != "" && errMsg == "" {
		errMsg = n.conflict
	}
	return phase, errMsg
}

// deviceStatus is what the device's status keys should say. It is pure:
// writeStatus writes what differs from the last write.
func deviceStatus(s snapshot, n statusNotes) map[string]string {
	phase, errMsg := statusPhase(s, n)
	export := ""
	if s.Export && n.exportServed {
		export = n.exportURI
	} else if n.guestView {
		export = n.guestURI
	}
	pid := ""
	if n.worker {
		pid = strconv.Itoa(n.workerPid)
	}
	format, path, _ := ParseParams(s.Params)
	if f, err := formats.Normalize(format); err == nil {
		format = f
	}
	want := map[string]string{
		keyPhase:       phase,
		keyError:       errMsg,
		keyExport:      export,
		keyWorkerPid:   pid,
		keyRestarts:    strconv.Itoa(n.restarts),
		keyName:        n.name,
		keyImageFormat: format,
		keyImagePath:   path,
	}
	// A device stopped by a fault also says why in the backend's `error`
	// key, where xenbus drivers report fatal errors for the toolstack.
	if phase == PhaseFailed || n.ringErr != "" || n.ringLost != "" {
		want["error"] = errMsg
	} else if n.hadError {
		want["error"] = ""
	}
	return want
}

// statusChanges is what of want differs from what was last written.
func statusChanges(last, want map[string]string) map[string]string {
	changed := map[string]string{}
	for k, v := range want {
		if old, ok := last[k]; !ok || old != v {
			changed[k] = v
		}
	}
	return changed
}

// statusRetry is how soon a refused status write is tried again, doubled
// at each refusal in a row up to 32 s: a quota or permission refusal
// neither floods xenstored nor the log.
const statusRetry = 500 * time.Millisecond

// writeStatus publishes the device's status under its backend directory,
// writing only keys whose value changed (every write fires watches).
func (d *Daemon) writeStatus(ctx context.Context, dev *device, s snapshot) {
	if !s.Present {
		return
	}
	if _, written := dev.st.status[keyPhase]; written && s.phase != dev.st.status[keyPhase] {
		// The directory was removed and declared again between two
		// observations (an unplug and a plug): what was written is
		// gone, so everything is written again.
		logged := dev.st.status["logged-uri"]
		dev.st.status, dev.st.statusLocked = map[string]string{"logged-uri": logged}, false
	}
	want := deviceStatus(s, d.statusNotes(dev))
	changed := statusChanges(dev.st.status, want)
	if len(changed) == 0 {
		return
	}
	be := d.backendPath(dev.key)
	err := d.xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		if _, err := tx.Read(ctx, be); err != nil {
			return err
		}
		if !dev.st.statusLocked {
			if err := d.lockStatusDir(ctx, tx, be); err != nil {
				return err
			}
		}
		kvs := make([][2]string, 0, len(changed))
		for k, v := range changed {
			kvs = append(kvs, [2]string{k, v})
		}
		return txWriteKeys(ctx, tx, be, kvs)
	})
	if err != nil {
		if !errors.Is(err, xenstore.ErrNotFound) {
			dev.st.statusFails++
			level := slog.LevelDebug
			if dev.st.statusFails == 1 {
				level = slog.LevelWarn
			}
			d.log.Log(ctx, level, "write status", "device", dev.key.String(), "err", err, "refusals", dev.st.statusFails)
			// A pass of its own writes it; not the resync's, tens of
			// seconds away.
			d.q.AddAfter(dev.key, statusRetry<<min(dev.st.statusFails-1, 6))
		}
		return
	}
	dev.st.statusFails = 0
	dev.st.statusLocked = true
	for k, v := range changed {
		dev.st.status[k] = v
	}
	d.publishRow(dev.key, deviceRow{name: dev.name, phase: want[keyPhase], restarts: dev.retry.restarts})
	if export := want[keyExport]; want[keyPhase] == PhaseConnected && export != "" && dev.st.status["logged-uri"] != export {
		dev.st.status["logged-uri"] = export
		d.log.Info("disk connected", "disk", dev.name, "device", dev.key.String(), "uri", export)
	}
}

// lockStatusDir makes be/blktap/ unreadable to the guest (it names host
// paths and pids): owned by the backend domain, no access for others.
// A node takes its parent's permissions when it is created, so the
// directory is locked before new keys go in; keys that already exist (an
// older daemon's, or the toolstack's) are locked one by one.
func (d *Daemon) lockStatusDir(ctx context.Context, tx *xenstore.Tx, be string) error {
	dir := be + "/" + statusDir
	perms := statusPerms(d.self)
	if err := tx.Mkdir(ctx, dir); err != nil {
		return err
	}
	if err := tx.SetPerms(ctx, dir, perms); err != nil {
		return err
	}
	keys, err := tx.Directory(ctx, dir)
	if err != nil {
		return err
	}
	for _, k := range keys {
		if err := tx.SetPerms(ctx, dir+"/"+k, perms); err != nil && !errors.Is(err, xenstore.ErrNotFound) {
			return err
		}
	}
	return nil
}

// statusPerms: the backend domain owns the blktap/ subtree; nobody else
// may read it.
func statusPerms(self uint32) []xenstore.Perm {
	return []xenstore.Perm{{Domid: self, Access: xenstore.PermNone}}
}
