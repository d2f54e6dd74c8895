package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"github.com/blktap-go/blktap/config"
	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/reconciler"
	"github.com/blktap-go/blktap/tapengine/nbdkernel"
	"github.com/blktap-go/blktap/tapengine/worker"
	"github.com/blktap-go/blktap/xenstore"
	"github.com/spf13/cobra"
)

// dialXenstore connects to the xenstored the daemon uses: --xenstore if
// given, else the one the daemon recorded in the state directory, else a
// real xenstored.
func dialXenstore(ctx context.Context, stateDir, explicit string) (*xenstore.Client, error) {
	path := xenstoreSocket(stateDir, explicit)
	if path == "" {
		return nil, fmt.Errorf("no xenstored found: is `blktap run` running? (%s)", stateDirHint(stateDir))
	}
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := xenstore.Dial(dctx, path)
	switch {
	case err == nil:
		return c, nil
	case explicit != "":
		return nil, fmt.Errorf("xenstored at %s (--xenstore): %w", path, err)
	case recordedXenstore(stateDir) == "":
		// The fallback failed: the real problem is more likely a state
		// directory no daemon has used than a missing xenstored.
		return nil, fmt.Errorf("no xenstored: none answers at %s (%v), and `blktap run` has recorded none in the %s",
			path, err, stateDirHint(stateDir))
	default:
		return nil, fmt.Errorf("xenstored at %s, recorded in the state directory %s: %w (is `blktap run` running?)", path, stateDir, err)
	}
}

// daemonFlags are the global flags the commands that talk to the
// daemon use: its state directory and the xenstored to reach it through.
func daemonFlags() (stateDir, xs string) { return defaultStateDir(), global.xenstore }

func parseDomid(s string) (uint32, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || n >= 0x7ff0 { // DOMID_FIRST_RESERVED
		return 0, usagef("DOMID %q: want a domain id (0 for dom0)", s)
	}
	return uint32(n), nil
}

func newAttachCommand() *cobra.Command {
	c := leaf("attach DOMID TYPE:PATH VDEV MODE [--nbd-device /dev/nbdN] [--timeout 60s]",
		"attach a disk; prints the NBD URI (on Xen: the guest's device; dom0: /dev/VDEV, then the URI)")
	c.Long = c.Short + `

MODE is r or w. The 2006 VM-config form is accepted too:
  blktap attach DOMID tap:TYPE:PATH,VDEV,MODE`
	timeout := c.Flags().Duration("timeout", 60*time.Second, "how long to wait for Connected")
	nbdDev := c.Flags().String("nbd-device", "", "domain 0: also connect this kernel nbd `DEVICE` (/dev/nbdN) to the export")
	c.RunE = func(_ *cobra.Command, pos []string) error {
		stateDir, xsPath := daemonFlags()
		return attach(pos, stateDir, xsPath, *timeout, *nbdDev)
	}
	return c
}

// attachRequest is attach's command line, checked.
type attachRequest struct {
	domid, devid       uint32
	format, path, mode string
}

// attachArgs checks attach's DOMID TYPE:PATH VDEV MODE.
func attachArgs(pos []string) (attachRequest, error) {
	var r attachRequest
	// The seed's VM-config form: tap:qcow:/img/a.qcow,xvdb,w
	if len(pos) == 2 && strings.Count(pos[1], ",") == 2 {
		parts := strings.Split(pos[1], ",")
		pos = []string{pos[0], parts[0], parts[1], parts[2]}
	}
	if len(pos) != 4 {
		return r, usagef("want DOMID TYPE:PATH VDEV MODE")
	}
	var err error
	if r.domid, err = parseDomid(pos[0]); err != nil {
		return r, err
	}
	if r.format, r.path, err = imageArg(pos[1]); err != nil {
		return r, err
	}
	if r.devid, err = config.ParseVdev(strings.TrimPrefix(pos[2], "/dev/")); err != nil {
		return r, usagef("VDEV: %v", err)
	}
	r.mode = pos[3]
	if r.mode != "r" && r.mode != "w" {
		return r, usagef("MODE %q: want r or w", r.mode)
	}
	return r, nil
}

func attach(pos []string, stateDir, xsPath string, timeout time.Duration, nbdDev string) error {
	r, err := attachArgs(pos)
	if err != nil {
		return err
	}
	domid, devid := r.domid, r.devid
	if nbdDev != "" {
		if domid != 0 {
			return usagef("--nbd-device is for domain-0 disks")
		}
		if err := nbdkernel.Available(nbdDev); err != nil {
			return err
		}
	}
	ctx := context.Background()
	xs, err := daemonXenstore(ctx, stateDir, xsPath, timeout)
	if err != nil {
		return err
	}
	defer xs.Close()
	key := reconciler.Key{Kind: reconciler.KindVBD3, Domid: domid, Devid: devid}
	name := fmt.Sprintf("d%d-%s", domid, config.VdevName(devid))
	err = reconciler.WriteDevice(ctx, xs, reconciler.DeviceSpec{
		Key: key, Name: name, Format: r.format, Path: r.path, Mode: r.mode,
		Vdev: config.VdevName(devid), Source: "attach", NBDDevice: nbdDev,
	})
	if err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return waitAttached(ctx, wctx, xs, key)
}

// waitAttached waits for the disk attach declared to connect, and prints
// what its user reaches it by; a disk that fails is taken away again.
func waitAttached(ctx, wctx context.Context, xs *xenstore.Client, key reconciler.Key) error {
	domid, devid := key.Domid, key.Devid
	// On Xen the domain's own xen-blkfront connects the disk, dom0's
	// included. A real guest gets to it when it gets to it (it may be
	// paused, or still booting): slowness there is no failure.
	onXen := reconciler.ProbeHost().Xen
	realGuest := domid != 0 && onXen
	uri, err := reconciler.WaitConnected(wctx, xs, key)
	if err != nil && realGuest && !errors.Is(err, reconciler.ErrDeviceFailed) && wctx.Err() != nil {
		return fmt.Errorf("disk %s is attached to domain %d, but the guest has not connected it yet (%v); "+
			"`blktap ls` shows its state, `blktap detach %d %s` removes it", config.VdevName(devid), domid, err, domid, config.VdevName(devid))
	}
	if err != nil && domid == 0 && onXen && !errors.Is(err, reconciler.ErrDeviceFailed) && wctx.Err() != nil {
		err = fmt.Errorf("%w; dom0's own xen-blkfront connects %s: is it loaded? (modprobe xen-blkfront)", err, key.FrontendPath())
	}
	if err != nil {
		// Like a toolstack whose hotplug failed: take the half-made
		// device away again, so a retry starts clean.
		dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if derr := reconciler.Detach(dctx, xs, key); derr != nil {
			return fmt.Errorf("%w (and removing the device failed: %v)", err, derr)
		}
		return err
	}
	switch {
	case realGuest:
		// Its blkfront shows the disk under this name (the export, for
		// QEMU's emulated disk, is in `blktap ls`).
		fmt.Println(config.VdevName(devid))
	case onXen:
		// dom0's blkfront shows it as /dev/VDEV; dom0's NBD clients
		// keep the export, the last line as without Xen.
		dev := "/dev/" + config.VdevName(devid)
		if err := waitDeviceNode(wctx, dev); err != nil {
			return fmt.Errorf("disk %s is connected, but %s did not appear: %w", key, dev, err)
		}
		fmt.Println(dev)
		fmt.Println(uri)
	default:
		fmt.Println(uri)
	}
	return nil
}

// waitDeviceNode waits for a block device node that a kernel driver is
// about to create (devtmpfs, or udev a moment later).
func waitDeviceNode(ctx context.Context, path string) error {
	for {
		if st, err := os.Stat(path); err == nil && st.Mode()&os.ModeDevice != 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// imageArg reads attach's (and resume --image's) TYPE:PATH into a format
// and, for image files, an absolute path that exists. A bare path (no
// TYPE: in front) is probed: one that holds raw bytes is served raw, and
// anything else must be named, because serving an image's container as a
// raw disk, read-write, lets the first write destroy it.
func imageArg(arg string) (format, path string, err error) {
	prefix, _, hasPrefix := strings.Cut(arg, ":")
	_, known := formats.Normalize(prefix)
	explicit := hasPrefix && !strings.HasPrefix(arg, "/") &&
		(known == nil || prefix == "tap" || prefix == "tap2")
	if explicit {
		if format, path, err = reconciler.ParseParams(arg); err != nil {
			return "", "", usagef("%v", err)
		}
		if format, err = formats.Normalize(format); err != nil {
			return "", "", usagef("%v", err)
		}
		if !formats.IsFile(format) {
			return format, path, nil // a RAM disk's name, an NBD URI
		}
	} else {
		path = arg
	}
	if path, err = filepath.Abs(path); err != nil {
		return "", "", err
	}
	if _, err := os.Stat(path); err != nil {
		if !explicit && hasPrefix && !strings.Contains(prefix, "/") {
			// "qcwo2:x": a misspelt format rather than a missing file.
			return "", "", usagef("%v", known)
		}
		return "", "", fmt.Errorf("image: %w", err)
	}
	if explicit {
		return format, path, nil
	}
	probed, err := formats.Probe(path)
	if err != nil {
		return "", "", fmt.Errorf("%s: %w; name its format (TYPE:PATH)", arg, err)
	}
	if probed != "raw" {
		return "", "", fmt.Errorf("%s is %s: write %s:%s, or raw:%s to serve its bytes", arg, probed, probed, arg, arg)
	}
	return "raw", path, nil
}

func newDetachCommand() *cobra.Command {
	return timed(leaf("detach DOMID VDEV [--timeout 60s]", "detach a disk: drain, flush, remove"),
		60*time.Second, "how long to wait for the disk to close", detach)
}

func detach(pos []string, timeout time.Duration) error {
	stateDir, xsPath := daemonFlags()
	if len(pos) != 2 {
		return usagef("want DOMID VDEV")
	}
	domid, err := parseDomid(pos[0])
	if err != nil {
		return err
	}
	devid, err := config.ParseVdev(strings.TrimPrefix(pos[1], "/dev/"))
	if err != nil {
		return usagef("VDEV: %v", err)
	}
	ctx := context.Background()
	// Without a daemon the disk never closes: fail now, not after the
	// timeout with the device half removed.
	xs, err := daemonXenstore(ctx, stateDir, xsPath, timeout)
	if err != nil {
		return err
	}
	defer xs.Close()
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	// The disk may be declared under any kind the daemon serves.
	self := reconciler.SelfDomid(ctx, xs)
	for _, kind := range []string{reconciler.KindVBD3, reconciler.KindTap, reconciler.KindVBD} {
		key := reconciler.Key{Kind: kind, Domid: domid, Devid: devid}
		if _, err := xs.Read(ctx, key.BackendPath(self)); err == nil {
			return reconciler.Detach(wctx, xs, key)
		}
	}
	return fmt.Errorf("no disk %s attached to domain %d", pos[1], domid)
}

// readLsEntries reads every device the daemon's domain backs, with the
// worker's counters where the daemon answers, in domain and device order.
func readLsEntries(ctx context.Context, xs *xenstore.Client, self uint32, stateDir string) ([]lsEntry, error) {
	root := xenstore.DomainPath(self) + "/backend" // a driver domain's own
	type found struct {
		kind     string
		dom, dev string
	}
	var devs []found
	for _, kind := range []string{reconciler.KindVBD3, reconciler.KindTap, reconciler.KindVBD} {
		doms, err := xs.Directory(ctx, root+"/"+kind)
		if errors.Is(err, xenstore.ErrNotFound) {
			continue
		} else if err != nil {
			return nil, err
		}
		for _, dom := range doms {
			ids, err := xs.Directory(ctx, root+"/"+kind+"/"+dom)
			if err != nil {
				continue
			}
			for _, dev := range ids {
				devs = append(devs, found{kind, dom, dev})
			}
		}
	}
	// Every read is sent before any answer is awaited: one after another,
	// each paid a wake-up of the daemon and of this process, and with every
	// disk busy that made `ls` take seconds (issue 16).
	type statsReply struct {
		stats []reconciler.DeviceStats
		err   error
	}
	statsc := make(chan statsReply, 1)
	go func() {
		st, err := reconciler.FetchStats(ctx, stateDir)
		statsc <- statsReply{st, err}
	}()
	entries := make([]lsEntry, len(devs))
	var wg sync.WaitGroup
	// A bound on the requests in flight at once (about 13 per device):
	// xenstored may cap a connection's outstanding requests (oxenstored's
	// quota-maxoutstanding), and a host may have hundreds of disks.
	slots := make(chan struct{}, 16)
	for i, f := range devs {
		wg.Add(1)
		slots <- struct{}{}
		go func() {
			defer func() { <-slots; wg.Done() }()
			entries[i] = readLsEntry(ctx, xs, root+"/"+f.kind+"/"+f.dom+"/"+f.dev, f.kind, f.dom, f.dev)
		}()
	}
	wg.Wait()
	if r := <-statsc; r.err == nil {
		byKey := map[string]*worker.Stats{}
		for _, st := range r.stats {
			byKey[st.Device] = st.Stats
		}
		for i := range entries {
			e := &entries[i]
			k := reconciler.Key{Kind: e.Kind, Domid: e.Domain, Devid: e.Devid}
			e.IO = byKey[k.String()]
		}
	}
	sort.Slice(entries, func(i, j int) bool {
		if entries[i].Domain != entries[j].Domain {
			return entries[i].Domain < entries[j].Domain
		}
		return entries[i].Devid < entries[j].Devid
	})
	return entries, nil
}

// lsSchema is the version of `blktap ls --json` (docs/LS-JSON.md): fields
// are only ever added within a version; a removal or a change of meaning
// makes a new one.
const lsSchema = 1

// lsEntry is one row of `blktap ls --json`; docs/LS-JSON.md documents
// every field.
type lsEntry struct {
	Schema    int    `json:"schema"`
	Name      string `json:"name"`
	Kind      string `json:"kind"`
	Domain    uint32 `json:"domain"`
	Device    string `json:"device"`
	Devid     uint32 `json:"devid"`
	Image     string `json:"image"`
	Format    string `json:"format"`
	Mode      string `json:"mode"`
	State     int    `json:"state"`
	StateName string `json:"state_name"`
	Frontend  int    `json:"frontend_state"`
	Phase     string `json:"phase"`
	Error     string `json:"error"`
	Export    string `json:"export"`
	WorkerPid int    `json:"worker_pid"`
	Restarts  int    `json:"restarts"`
	// IO holds the worker's counters, when the daemon answers.
	IO *worker.Stats `json:"io,omitempty"`
}

func newLsCommand() *cobra.Command {
	c := leaf("ls [-o wide | --json]", "list devices (80 columns; -o wide: state, worker, I/O, export; --json: docs/LS-JSON.md)")
	asJSON := c.Flags().Bool("json", false, "JSON output, an array of devices (docs/LS-JSON.md)")
	output := c.Flags().StringP("output", "o", "", "`wide`: every column (state, phase, worker, I/O, export, error)")
	fixedChoices(c, "output", "wide")
	c.RunE = func(_ *cobra.Command, pos []string) error { return ls(pos, *asJSON, *output) }
	return c
}

func ls(pos []string, asJSON bool, output string) error {
	stateDir, xsPath := daemonFlags()
	if len(pos) > 0 {
		return usagef("unexpected argument %q", pos[0])
	}
	if output != "" && output != "wide" {
		return usagef("-o %q: the only output is wide (or --json)", output)
	}
	ctx := context.Background()
	xs, err := dialXenstore(ctx, stateDir, xsPath)
	if err != nil {
		return err
	}
	defer xs.Close()
	self := reconciler.SelfDomid(ctx, xs)
	if msg, err := xs.Read(ctx, reconciler.ConfigErrorPath(self)); err == nil && msg != "" {
		// On standard error: the table and the JSON keep their shape.
		fmt.Fprintf(os.Stderr, "blktap: the daemon kept its previous desired state: %s\n", msg)
	}
	entries, err := readLsEntries(ctx, xs, self, stateDir)
	if err != nil {
		return err
	}
	if asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(entries)
	}
	if output == "wide" {
		return lsWide(os.Stdout, entries)
	}
	return lsShort(os.Stdout, entries, 80)
}

// lsWide is `ls -o wide`: every column, one line per device however long.
func lsWide(w io.Writer, entries []lsEntry) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tDOMAIN\tDEVICE\tFORMAT\tIMAGE\tMODE\tSTATE\tPHASE\tPID\tREAD\tWRITTEN\tEXPORT\tERROR")
	for _, e := range entries {
		pid := "-"
		if e.WorkerPid > 0 {
			pid = strconv.Itoa(e.WorkerPid)
		}
		rd, wr := "-", "-"
		if e.IO != nil {
			rd, wr = formats.FormatSize(int64(e.IO.BytesRead)), formats.FormatSize(int64(e.IO.BytesWritten))
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", e.Name, e.Domain, e.Device, e.Format,
			e.Image, e.Mode, e.StateName, e.Phase, pid, rd, wr, e.Export, e.Error)
	}
	return tw.Flush()
}

// lsShort is the default view: NAME DOM VDEV FORMAT STATE IMAGE within
// width columns (the image path shortened in the middle when it must be),
// then each device's error on a line of its own, so no error hides in a
// column nobody sees.
func lsShort(w io.Writer, entries []lsEntry, width int) error {
	rows := [][]string{{"NAME", "DOM", "VDEV", "FORMAT", "STATE", "IMAGE"}}
	for _, e := range entries {
		// The daemon's phase says more than the xenbus state while a
		// device is on its way or has failed.
		state := e.StateName
		if e.Phase != "" && e.Phase != reconciler.PhaseConnected {
			state = e.Phase
		}
		if e.Error != "" {
			state += "!"
		}
		name := e.Name
		if name == "" {
			name = "-"
		}
		rows = append(rows, []string{name, strconv.FormatUint(uint64(e.Domain), 10), e.Device, e.Format, state, e.Image})
	}
	const gap = 2
	widths := make([]int, len(rows[0]))
	for _, r := range rows {
		for i, c := range r[:len(r)-1] {
			widths[i] = max(widths[i], utf8.RuneCountInString(c))
		}
	}
	used := 0
	for _, n := range widths[:len(widths)-1] {
		used += n + gap
	}
	room := max(width-used, 16) // the image keeps at least this much
	var b strings.Builder
	for _, r := range rows {
		b.Reset()
		for i, c := range r[:len(r)-1] {
			b.WriteString(c)
			b.WriteString(strings.Repeat(" ", widths[i]-utf8.RuneCountInString(c)+gap))
		}
		b.WriteString(elideMiddle(r[len(r)-1], room))
		if _, err := fmt.Fprintln(w, strings.TrimRight(b.String(), " ")); err != nil {
			return err
		}
	}
	for _, e := range entries {
		if e.Error != "" {
			if _, err := fmt.Fprintf(w, "%s (domain %d %s): %s\n", e.Name, e.Domain, e.Device, e.Error); err != nil {
				return err
			}
		}
	}
	return nil
}

// elideMiddle shortens s to n runes by replacing its middle with "…",
// keeping the file name at the end, which tells images apart best.
func elideMiddle(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	tail := (n - 1) * 2 / 3
	if i := strings.LastIndexByte(s, '/'); i >= 0 {
		// The whole "/name" when it leaves a few runes of the head.
		tail = max(tail, min(utf8.RuneCountInString(s[i:]), n-1-4))
	}
	head := n - 1 - tail
	return string(r[:head]) + "…" + string(r[len(r)-tail:])
}

// lsKeys are the backend's nodes one `ls` row shows.
var lsKeys = []string{"frontend", "blktap/worker-pid", "blktap/restarts", "state", "blktap/name", "mode",
	"blktap/phase", "blktap/error", "blktap/export", "blktap/format", "blktap/image", "params"}

// readLsEntry reads one backend directory's row, its reads in flight
// together (a missing node reads as "").
func readLsEntry(ctx context.Context, xs *xenstore.Client, be, kind, dom, dev string) lsEntry {
	vals := make([]string, len(lsKeys))
	var wg sync.WaitGroup
	for i, k := range lsKeys {
		wg.Add(1)
		go func() { defer wg.Done(); vals[i], _ = xs.Read(ctx, be+"/"+k) }()
	}
	wg.Wait()
	get := func(k string) string { return vals[slices.Index(lsKeys, k)] }
	d, _ := strconv.ParseUint(dom, 10, 32)
	id, _ := strconv.ParseUint(dev, 10, 32)
	feState := ""
	if fe := get("frontend"); fe != "" {
		feState, _ = xs.Read(ctx, fe+"/state")
	}
	pid, _ := strconv.Atoi(get("blktap/worker-pid"))
	restarts, _ := strconv.Atoi(get("blktap/restarts"))
	st := reconciler.ParseState(get("state"))
	e := lsEntry{
		Schema: lsSchema, Name: get("blktap/name"), Kind: kind, Domain: uint32(d), Devid: uint32(id),
		Device: config.VdevName(uint32(id)), Mode: get("mode"),
		State: int(st), StateName: st.String(), Frontend: int(reconciler.ParseState(feState)),
		Phase: get("blktap/phase"), Error: get("blktap/error"), Export: get("blktap/export"),
		WorkerPid: pid, Restarts: restarts,
		Format: get("blktap/format"), Image: get("blktap/image"),
	}
	if e.Image == "" {
		e.Format, e.Image, _ = reconciler.ParseParams(get("params"))
	}
	return e
}
