package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"syscall"

	"github.com/blktap-go/blktap/config"
	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/internal/logsetup"
	"github.com/blktap-go/blktap/internal/maxprocs"
	"github.com/blktap-go/blktap/internal/units"
	"github.com/blktap-go/blktap/reconciler"
	"github.com/blktap-go/blktap/tapengine/worker"
	"github.com/blktap-go/blktap/xenstore/xscli"
	"github.com/spf13/cobra"
)

// DefaultConfig is the desired-state file `blktap run` reads when -c is
// not given and the file exists (the Debian package installs an empty one).
const DefaultConfig = "/etc/blktap/disks.yaml"

// configPath is run's -c value when given (-c "" for no file), else def
// if that file exists, else "".
func configPath(given bool, flagValue, def string) string {
	if given {
		return flagValue
	}
	if _, err := os.Stat(def); err == nil {
		return def
	}
	return ""
}

// runOptions is `blktap run`'s command line.
type runOptions struct {
	config              string
	configGiven         bool
	serveVBD, dryRun    bool
	metrics, ramMax     string
	imageDirs, nbdAllow []string
	rbdAllow            []string
	persistentGrants    string
}

func newRunCommand() *cobra.Command {
	c := leaf("run [-c disks.yaml] [--image-dir DIR]... [--nbd-allow SERVER]... [--rbd-allow POOL]... [--ram-max SIZE] [--serve-vbd] [--persistent-grants auto|on|off] [--metrics ADDR] [--dry-run]",
		"the daemon: serve every declared disk (SIGTERM: exit, disks stay served)")
	c.Long = c.Short + "\n\n--ram-max defaults to half of this machine's memory: " + formats.FormatSize(reconciler.DefaultRAMMax()) + " here."
	var o runOptions
	f := c.Flags()
	f.StringVarP(&o.config, "config", "c", "", "the YAML desired-state `FILE` (default "+DefaultConfig+" if it exists; -c '' for none)")
	f.BoolVar(&o.serveVBD, "serve-vbd", false, "also serve backend/vbd: on a Xen host the disks whose hotplug script is block-blktap (xen-blkback must not be loaded)")
	f.BoolVar(&o.dryRun, "dry-run", false, "check the YAML file and print the disks it declares, then exit")
	f.StringVar(&o.metrics, "metrics", "", "serve Prometheus metrics at http://`ADDR`/metrics (e.g. 127.0.0.1:9525)")
	f.StringArrayVar(&o.imageDirs, "image-dir", nil, "a `DIR` images and backing files may come from (repeatable; the state dir and the YAML images' directories always may)")
	f.StringArrayVar(&o.nbdAllow, "nbd-allow", nil, "a `SERVER` nbd: disks may use: a socket or a directory of sockets (absolute path), HOST, HOST:PORT or an address block like 10.0.0.0/8 (repeatable, or a comma list; sockets in the image directories are always allowed)")
	f.StringArrayVar(&o.rbdAllow, "rbd-allow", nil, "a `POOL` rbd: disks may use: POOL, POOL/NAMESPACE or POOL/*, with the :conf=..:id=..:keyring=.. a source must carry (repeatable; the pools of the YAML's rbd disks always may)")
	f.StringVar(&o.persistentGrants, "persistent-grants", "auto", "when guests are offered blkif persistent grants: `auto` (only where dom0's gntdev lacks grant copy), on (always, as blkback does) or off")
	f.StringVar(&o.ramMax, "ram-max", "", "the largest RAM disk (ram:NAME?size=SIZE) an attach may create, a `SIZE` like 4G (default: half of this machine's memory)")
	c.MarkFlagFilename("config", "yaml", "yml")
	c.MarkFlagDirname("image-dir")
	c.RunE = func(c *cobra.Command, pos []string) error {
		o.configGiven = c.Flags().Changed("config")
		return cmdRun(pos, o)
	}
	return c
}

func cmdRun(pos []string, o runOptions) error {
	if len(pos) > 0 {
		return usagef("unexpected argument %q", pos[0])
	}
	var allow []string
	for _, v := range o.nbdAllow {
		for _, e := range strings.Split(v, ",") {
			allow = append(allow, strings.TrimSpace(e))
		}
	}
	if err := reconciler.CheckNBDAllow(allow); err != nil {
		return usagef("%v", err)
	}
	rbdAllow, err := reconciler.ParseRBDAllow(o.rbdAllow)
	if err != nil {
		return usagef("%v", err)
	}
	grants, err := reconciler.ParsePersistentGrants(o.persistentGrants)
	if err != nil {
		return usagef("%v", err)
	}
	ramLimit := reconciler.DefaultRAMMax()
	if o.ramMax != "" {
		var err error
		if ramLimit, err = units.ParseSize(o.ramMax); err != nil || ramLimit <= 0 {
			return usagef("--ram-max %q: want a size like 512M or 4G", o.ramMax)
		}
	}
	cfg := configPath(o.configGiven, o.config, DefaultConfig)
	if o.dryRun {
		if cfg == "" {
			return usagef("--dry-run needs -c FILE (%s does not exist)", DefaultConfig)
		}
		return dryRun(cfg)
	}
	sd, err := filepath.Abs(defaultStateDir())
	if err != nil {
		return err
	}
	ver, commit, _, _ := buildVersion()
	maxprocs.AtLeastTwo()
	log := logsetup.New()
	stopProfile, err := startCPUProfile(os.Getenv("BLKTAP_CPUPROFILE"))
	if err != nil {
		return err
	}
	defer stopProfile()
	return reconciler.Run(context.Background(), reconciler.Options{
		StateDir:         sd,
		ConfigPath:       cfg,
		XenstorePath:     global.xenstore,
		ServeVBD:         o.serveVBD,
		PersistentGrants: grants,
		ImageDirs:        absPaths(o.imageDirs),
		NBDAllow:         allow,
		RBDAllow:         rbdAllow,
		RAMMax:           ramLimit,
		MetricsAddr:      o.metrics,
		Logger:           log,
		Exe:              workerExe(log),
		Version:          ver,
		Commit:           commit,
	})
}

// startCPUProfile profiles the daemon's CPU into file until stop, for
// finding where convergence spends its time (docs/PERFORMANCE.md); ""
// profiles nothing. An environment variable, not a flag: it is a
// developer's tool, and the workers, which never read it, stay unprofiled.
func startCPUProfile(file string) (stop func(), err error) {
	if file == "" {
		return func() {}, nil
	}
	f, err := os.Create(file)
	if err != nil {
		return nil, fmt.Errorf("BLKTAP_CPUPROFILE: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("BLKTAP_CPUPROFILE: %w", err)
	}
	return func() { pprof.StopCPUProfile(); f.Close() }, nil
}

// dryRun is a free dry run (the plan is pure): what the daemon would do
// for each disk of the file cfg on a fresh start, here, without touching
// anything.
func dryRun(cfg string) error {
	f, err := config.Load(cfg)
	if err != nil {
		return err
	}
	_, gntdev := os.Stat("/dev/xen/gntdev")
	for _, d := range f.Disks {
		fmt.Printf("%s: %s:%s domain %d device %s (%d) mode %s\n", d.Name, d.Format, d.Image, d.Domain, config.VdevName(d.DevID), d.DevID, d.Mode)
		if formats.IsFile(d.Format) {
			if _, err := os.Stat(d.Image); err != nil && d.Create != nil {
				fmt.Printf("  create-image: %s %s, %s\n", d.Format, formats.FormatSize(d.Create.Size), d.Image)
			} else if err != nil {
				fmt.Printf("  (image missing and no create: the disk would fail)\n")
			}
		}
		fmt.Printf("  declare: /local/domain/0/backend/vbd3/%d/%d and /local/domain/%d/device/vbd/%d\n", d.Domain, d.DevID, d.Domain, d.DevID)
		m := reconciler.NewModel(d.Domain == 0, d.Domain != 0 && gntdev != nil)
		for _, a := range m.Converge() {
			fmt.Printf("  %s\n", a)
		}
		fmt.Printf("  = %s\n", m.State())
	}
	return nil
}

func newWorkerCommand() *cobra.Command {
	c := leaf("__worker --name NAME [--adopt]", "a disk's worker process (started by the daemon)")
	c.Hidden = true
	name := c.Flags().String("name", "", "the disk's `NAME` (for logs)")
	adopt := c.Flags().Bool("adopt", false, "descriptor 4 is the socket a restarted daemon adopts this worker on")
	c.RunE = func(*cobra.Command, []string) error {
		// The daemon closes each disk in order on SIGTERM; a signal that
		// reaches the worker directly (a process-group kill) means the same.
		signal.Ignore(syscall.SIGINT, syscall.SIGHUP)
		log := logsetup.New().With("worker", *name, "pid", os.Getpid())
		maxprocs.AtLeastTwo()
		os.Exit(worker.Main(log, *adopt))
		return nil
	}
	return c
}

func newXenstoredCommand() *cobra.Command {
	c := leaf("xenstored --socket PATH", "the embedded xenstored on its own")
	sock := c.Flags().String("socket", "", "the unix socket to listen on, `PATH` (made with mode 0600)")
	c.MarkFlagFilename("socket")
	c.RunE = func(_ *cobra.Command, pos []string) error {
		return cmdXenstored(append([]string{"--socket=" + *sock}, pos...))
	}
	return c
}

func cmdXenstored(args []string) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if code := xscli.Xenstored(ctx, args, os.Stderr); code != 0 {
		return exitCode(code)
	}
	return nil
}

// absPaths makes each path absolute; one that cannot be is left out.
func absPaths(paths []string) []string {
	var out []string
	for _, p := range paths {
		if a, err := filepath.Abs(p); err == nil {
			out = append(out, a)
		}
	}
	return out
}
