// Command blktap is the blktap-go toolkit: the daemon that serves Xen tap
// disks (`blktap run`), its per-disk workers, the attach/detach tools, the
// image tools and a xenstore client and server. Invoked as qcow-create,
// img2qcow or qcow2raw it is the 2006 tool of that name, and as tap-ctl it
// is tap-ctl; those keep their own syntax and usage texts.
//
// The blktap command line is one cobra command tree (cli.go), and
// everything that describes it is made from that tree: --help, the man
// page, the completions and README's command list (docs_test.go checks the
// shipped copies and rewrites them with -rewrite).

// The runtime re-reads the CPU affinity and cgroup limit every second to
// adjust GOMAXPROCS (Go 1.25's updatemaxprocs): a wake-up per second in
// every idle worker, for a limit that does not change under a disk. The
// limit is still read once at start.
//
//go:debug updatemaxprocs=0
package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// usageError is a mistake on the command line: reported with the usage
// line and exit status 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return &usageError{fmt.Sprintf(format, args...)} }

func main() {
	os.Exit(run(os.Args))
}

// run is the whole program, argv[0] included, returning the exit status.
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
		var c *cobra.Command
		c, err = executeC(argv[1:])
		name = "blktap"
		if c != nil {
			cmdUsage = c.UseLine()
		}
	}
	return exitStatus(name, cmdUsage, err)
}

// exitStatus reports err on standard error the way its kind asks for and
// returns the status to exit with.
func exitStatus(name, cmdUsage string, err error) int {
	if err == nil {
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

// execute runs one blktap command line (without argv[0]) through a fresh
// command tree, as tests call it.
func execute(args []string) error {
	_, err := executeC(args)
	return err
}

// executeC runs args and returns the command that ran (or whose flags
// were wrong), for its usage line.
func executeC(args []string) (*cobra.Command, error) {
	root := newRoot()
	root.SetArgs(twoDashLongFlags(root, resizeArgs(args)))
	return root.ExecuteC()
}

// twoDashLongFlags rewrites -name and -name=value as --name... wherever
// name is a long flag of the tree: Go's flag package, which blktap used
// before, took long flags with one dash, and scripts and habits still
// write them so (`blktap -state-dir D ls`). pflag would read one dash as
// a cluster of one-letter flags. Nothing after "--" is touched.
func twoDashLongFlags(root *cobra.Command, args []string) []string {
	long := map[string]bool{}
	var collect func(c *cobra.Command)
	collect = func(c *cobra.Command) {
		c.LocalFlags().VisitAll(func(f *pflag.Flag) { long[f.Name] = true })
		c.PersistentFlags().VisitAll(func(f *pflag.Flag) { long[f.Name] = true })
		for _, sub := range c.Commands() {
			collect(sub)
		}
	}
	collect(root)
	out := make([]string, 0, len(args))
	for i, a := range args {
		if a == "--" {
			return append(out, args[i:]...)
		}
		name, _, _ := strings.Cut(strings.TrimPrefix(a, "-"), "=")
		if len(a) > 2 && a[0] == '-' && a[1] != '-' && len(name) > 1 && long[name] {
			a = "-" + a
		}
		out = append(out, a)
	}
	return out
}

// global holds the flags every command takes, before or after its name.
var global struct {
	stateDir  string
	xenstore  string
	logFormat string
	logLevel  string
}

// defaultStateDir is --state-dir, else (docs/ARCHITECTURE.md, section "Process model"): $BLKTAP_STATE_DIR, else /run/blktap for
// root, else $XDG_RUNTIME_DIR/blktap (or a directory under /tmp).
func defaultStateDir() string {
	if global.stateDir != "" {
		return global.stateDir
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
