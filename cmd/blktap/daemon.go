package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/blktap-go/blktap/config"
	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/internal/units"
	"github.com/blktap-go/blktap/reconciler"
	"github.com/blktap-go/blktap/tapengine/worker"
	"github.com/blktap-go/blktap/xenstore/xscli"
)

// newLogger logs to standard error as text, or JSON when BLKTAP_LOG_FORMAT
// (or run's --log-format, which sets it for the workers too) says json.
// When standard error is journald's stream, each line starts with its
// syslog priority and goes without a time (journald adds its own).
func newLogger() *slog.Logger {
	opts := &slog.HandlerOptions{Level: slog.LevelInfo}
	if os.Getenv("BLKTAP_DEBUG") != "" {
		opts.Level = slog.LevelDebug
	}
	newHandler := func(w io.Writer) slog.Handler {
		if os.Getenv("BLKTAP_LOG_FORMAT") == "json" {
			return slog.NewJSONHandler(w, opts)
		}
		return slog.NewTextHandler(w, opts)
	}
	if stderrIsJournal() {
		opts.ReplaceAttr = func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		}
		return slog.New(newJournalHandler(os.Stderr, newHandler))
	}
	return slog.New(newHandler(os.Stderr))
}

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

func cmdRun(args []string) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	cfg := fs.String("c", "", "YAML desired-state file (default "+DefaultConfig+" if it exists; -c '' for none)")
	fs.StringVar(cfg, "config", "", "same as -c")
	stateDir := fs.String("state-dir", defaultStateDir(), "state directory (sockets, embedded xenstored)")
	xs := fs.String("xenstore", "", "xenstored socket (default: a real one if reachable, else embedded)")
	serveVBD := fs.Bool("serve-vbd", false, "also serve backend/vbd: on a Xen host the disks whose hotplug script is block-blktap (xen-blkback must not be loaded)")
	dryRun := fs.Bool("dry-run", false, "check the YAML file and print the disks it declares, then exit")
	logFormat := fs.String("log-format", "text", "log format: text or json")
	metrics := fs.String("metrics", "", "serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9525)")
	var imageDirs, nbdAllow stringList
	fs.Var(&imageDirs, "image-dir", "a directory images and backing files may come from (repeatable; the state dir and the YAML images' directories always may)")
	fs.Var(&nbdAllow, "nbd-allow", "an NBD server nbd: disks may use: a socket or a directory of sockets (absolute path), HOST, HOST:PORT or an address block like 10.0.0.0/8 (repeatable, or a comma list; sockets in the image directories are always allowed)")
	ramMaxDefault := reconciler.DefaultRAMMax()
	ramMax := fs.String("ram-max", "", "the largest RAM disk (ram:NAME?size=SIZE) an attach may create, e.g. 4G (default: half of this machine's memory, "+formats.FormatSize(ramMaxDefault)+" here)")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q", pos[0])
	}
	var allow []string
	for _, v := range nbdAllow {
		for _, e := range strings.Split(v, ",") {
			allow = append(allow, strings.TrimSpace(e))
		}
	}
	if err := reconciler.CheckNBDAllow(allow); err != nil {
		return usagef("%v", err)
	}
	ramLimit := ramMaxDefault
	if *ramMax != "" {
		if ramLimit, err = units.ParseSize(*ramMax); err != nil || ramLimit <= 0 {
			return usagef("--ram-max %q: want a size like 512M or 4G", *ramMax)
		}
	}
	switch *logFormat {
	case "text", "json":
		os.Setenv("BLKTAP_LOG_FORMAT", *logFormat) // inherited by the workers
	default:
		return usagef("--log-format %q: want text or json", *logFormat)
	}
	given := false
	fs.Visit(func(f *flag.Flag) { given = given || f.Name == "c" || f.Name == "config" })
	*cfg = configPath(given, *cfg, DefaultConfig)
	if *dryRun {
		if *cfg == "" {
			return usagef("--dry-run needs -c FILE (%s does not exist)", DefaultConfig)
		}
		f, err := config.Load(*cfg)
		if err != nil {
			return err
		}
		// A free dry run (the plan is pure): what the daemon would do for
		// each disk on a fresh start, here, without touching anything.
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
	sd, err := filepath.Abs(*stateDir)
	if err != nil {
		return err
	}
	return reconciler.Run(context.Background(), reconciler.Options{
		StateDir:     sd,
		ConfigPath:   *cfg,
		XenstorePath: *xs,
		ServeVBD:     *serveVBD,
		ImageDirs:    imageDirs.abs(),
		NBDAllow:     allow,
		RAMMax:       ramLimit,
		MetricsAddr:  *metrics,
		Logger:       newLogger(),
	})
}

func cmdWorker(args []string) error {
	fs := flag.NewFlagSet("__worker", flag.ContinueOnError)
	name := fs.String("name", "", "disk name (for logs)")
	adopt := fs.Bool("adopt", false, "descriptor 4 is the socket a restarted daemon adopts this worker on")
	if _, err := parseInterleaved(fs, args); err != nil {
		return err
	}
	// The daemon closes each disk in order on SIGTERM; a signal that
	// reaches the worker directly (a process-group kill) means the same.
	signal.Ignore(syscall.SIGINT, syscall.SIGHUP)
	log := newLogger().With("worker", *name, "pid", os.Getpid())
	os.Exit(worker.Main(log, *adopt))
	return nil
}

func cmdXenstored(args []string) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if code := xscli.Xenstored(ctx, args, os.Stderr); code != 0 {
		return exitCode(code)
	}
	return nil
}

// stringList is a repeatable string flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

func (l stringList) abs() []string {
	var out []string
	for _, p := range l {
		if a, err := filepath.Abs(p); err == nil {
			out = append(out, a)
		}
	}
	return out
}
