// Command blktap is the blktap-go toolkit: the daemon that serves Xen tap
// disks (`blktap run`), its per-disk workers, the attach/detach tools, the
// image tools and a xenstore client and server. Invoked as qcow-create,
// img2qcow or qcow2raw it is the 2006 tool of that name.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// usageError is a mistake on the command line: reported with the usage
// line and exit status 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return &usageError{fmt.Sprintf(format, args...)} }

type command struct {
	name  string
	usage string // after the command name
	brief string
	run   func(args []string) error
	// hidden commands are left out of the help text.
	hidden bool
}

var commands []command

func init() {
	commands = []command{
		{name: "run", usage: "[-c disks.yaml] [--state-dir DIR] [--image-dir DIR]... [--nbd-allow SERVER]... [--ram-max SIZE] [--xenstore PATH] [--serve-vbd] [--metrics ADDR] [--dry-run]", brief: "the daemon: serve every declared disk (SIGTERM: exit, disks stay served)", run: cmdRun},
		{name: "shutdown", usage: "[--state-dir DIR] [--timeout 5m]", brief: "flush and close every disk, stop the daemon (host shutdown)", run: cmdShutdown},
		{name: "attach", usage: "DOMID TYPE:PATH VDEV MODE [--nbd-device /dev/nbdN] [--state-dir DIR]", brief: "attach a disk; prints the NBD URI (on Xen: the guest's device; dom0: /dev/VDEV, then the URI)", run: cmdAttach},
		{name: "detach", usage: "DOMID VDEV [--state-dir DIR]", brief: "detach a disk: drain, flush, remove", run: cmdDetach},
		{name: "pause", usage: "DOMID VDEV", brief: "hold the disk's I/O, flush and close its image (resume continues)", run: cmdPause},
		{name: "resume", usage: "DOMID VDEV [--image TYPE:PATH]", brief: "reopen the image, or switch to another of the same size", run: cmdResume},
		{name: "snapshot", usage: "DOMID VDEV NEWFILE [-f FMT]", brief: "live: the image becomes the base of a new overlay NEWFILE", run: cmdSnapshot},
		{name: "hotplug", usage: "add|remove [--state-dir DIR] [--timeout 30s]", brief: "libxl's hotplug script for disks the daemon serves (scripts/xen/block-blktap; needs XENBUS_PATH)", run: cmdHotplug},
		{name: "ls", usage: "[-o wide | --json] [--state-dir DIR]", brief: "list devices (80 columns; -o wide: state, worker, I/O, export; --json: docs/LS-JSON.md)", run: cmdLs},
		{name: "image", usage: "create|info|check|map|convert|compare|measure ...", brief: "image tools (`blktap image help`)", run: cmdImage},
		{name: "xenstore", usage: "read|write|ls|list|rm|mkdir|chmod|exists|watch ...", brief: "a xenstore client for either xenstored (`blktap xenstore` alone for help)", run: cmdXenstore},
		{name: "xenstored", usage: "--socket PATH", brief: "the embedded xenstored on its own", run: cmdXenstored},
		{name: "__worker", usage: "--name NAME", brief: "a disk's worker process (started by the daemon)", run: cmdWorker, hidden: true},
		{name: "version", usage: "", brief: "print the version and commit (also --version)", run: cmdVersion},
		{name: "help", usage: "", brief: "this text", run: func([]string) error { usage(os.Stdout); return nil }},
	}
}

func usage(w io.Writer) {
	fmt.Fprintf(w, "usage: blktap [--state-dir DIR] COMMAND [ARGS]\n\ncommands:\n")
	for _, c := range commands {
		if c.hidden {
			continue
		}
		fmt.Fprintf(w, "  %-9s %s\n            %s\n", c.name, c.usage, c.brief)
	}
	fmt.Fprintf(w, "\nthe 2006 tools (links to this binary):\n"+
		"  qcow-create [-r] SIZE_MB FILE [BACKING]\n  img2qcow QCOW_FILE IMAGE\n  qcow2raw RAW_FILE QCOW_FILE\n"+
		"\nState directory: --state-dir (before or after the command), else $BLKTAP_STATE_DIR, else /run/blktap (root) or $XDG_RUNTIME_DIR/blktap.\n")
}

func main() {
	os.Exit(run(os.Args))
}

func run(argv []string) int {
	name := filepath.Base(argv[0])
	var err error
	var cmdUsage string
	switch name {
	case "qcow-create", "img2qcow", "qcow2raw":
		err = seedTool(name, argv[1:])
		cmdUsage = name
	case "tap-ctl":
		err, cmdUsage = cmdTapCtl(argv[1:]), "tap-ctl COMMAND [OPTIONS] (tap-ctl help)"
	default:
		rest, gerr := globalOptions(argv[1:])
		if gerr != nil {
			fmt.Fprintf(os.Stderr, "blktap: %v\n", gerr)
			usage(os.Stderr)
			return 2
		}
		if len(rest) == 0 {
			usage(os.Stderr)
			return 2
		}
		argv = append(argv[:1:1], rest...)
		sub := argv[1]
		switch sub {
		case "-h", "--help":
			sub = "help"
		case "--version", "-version":
			sub = "version"
		}
		var c *command
		for i := range commands {
			if commands[i].name == sub {
				c = &commands[i]
			}
		}
		if c == nil {
			fmt.Fprintf(os.Stderr, "blktap: unknown command %q\n", sub)
			usage(os.Stderr)
			return 2
		}
		cmdUsage = "blktap " + c.name + " " + c.usage
		err = c.run(argv[2:])
	}
	if err == nil {
		return 0
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	var code exitCode
	if errors.As(err, &code) {
		return int(code) // the subcommand has said why
	}
	var su *seedUsage
	if errors.As(err, &su) {
		fmt.Fprintln(os.Stderr, su.text)
		return 2
	}
	var ue *usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(os.Stderr, "%s: %s\nusage: %s\n", name, ue.msg, strings.TrimSpace(cmdUsage))
		return 2
	}
	fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
	return 1
}

// parseInterleaved parses flags that may come before, between or after
// positional arguments (`blktap pause 1 xvdb --image qcow:/x`), and returns
// the positional ones. "--" ends flags.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	fs.SetOutput(io.Discard)
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				fs.SetOutput(os.Stdout)
				fs.PrintDefaults()
				return nil, err
			}
			return nil, usagef("%v", err)
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		if args[0] == "--" {
			return append(pos, args[1:]...), nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

// globalStateDir is a --state-dir given before the command
// (`blktap --state-dir D ls`); a command's own --state-dir overrides it.
var globalStateDir string

// globalOptions takes the options every command shares when they come
// before the command name (--state-dir DIR, --state-dir=DIR, with one or
// two dashes) and returns the arguments from the command name on.
func globalOptions(args []string) ([]string, error) {
	for len(args) > 0 {
		a := args[0]
		name, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || name != "state-dir" {
			return args, nil
		}
		if !hasVal {
			if len(args) < 2 || args[1] == "" {
				return nil, fmt.Errorf("%s needs a directory", a)
			}
			val, args = args[1], args[1:]
		}
		if val == "" {
			return nil, fmt.Errorf("%s needs a directory", a)
		}
		globalStateDir = val
		args = args[1:]
	}
	return args, nil
}

// defaultStateDir is a global --state-dir, else DESIGN.md's: $BLKTAP_STATE_DIR, else /run/blktap for
// root, else $XDG_RUNTIME_DIR/blktap (or a directory under /tmp).
func defaultStateDir() string {
	if globalStateDir != "" {
		return globalStateDir
	}
	if d := os.Getenv("BLKTAP_STATE_DIR"); d != "" {
		return d
	}
	if os.Geteuid() == 0 {
		return "/run/blktap"
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "blktap")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("blktap-%d", os.Geteuid()))
}
