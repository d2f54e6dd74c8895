package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// Why cobra: it is what most Go system tools (kubectl, etcdctl, docker,
// hugo) are built on, so administrators already know its GNU long flags,
// its help layout and its completion, and it is well kept; it generates
// bash, zsh and fish completion from the same tree as --help, which is
// what keeps the shipped completion honest.

// rootSynopsis is the first line of `blktap --help`: the global flags,
// which may also follow the command name.
const rootSynopsis = "blktap [--state-dir DIR] [--xenstore PATH] [--log-format text|json] [--log-level debug|info|warn|error] COMMAND [ARGS]"

// seedSynopses are the 2006 tools (and tap-ctl) that are links to this
// binary; their own usage texts are theirs and are not made here.
var seedSynopses = []string{
	"qcow-create [-r] SIZE_MB FILE [BACKING]",
	"img2qcow QCOW_FILE IMAGE",
	"qcow2raw RAW_FILE QCOW_FILE",
	"tap-ctl COMMAND [OPTIONS]",
}

// newRoot builds the whole command tree. It is built anew for each command
// line so that no flag value of one run leaks into the next (tests run
// several in one process).
func newRoot() *cobra.Command {
	cobra.EnableCommandSorting = false // the order below is the help's
	global.stateDir, global.xenstore = "", ""
	root := &cobra.Command{
		Use:   rootSynopsis,
		Short: "serve Xen tap disks from user space",
		// A word that is no command is a usage error, not a help text
		// with exit status 0.
		Args: func(c *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usagef("unknown command %q", args[0])
			}
			return nil
		},
		RunE: func(c *cobra.Command, _ []string) error {
			writeHelp(os.Stderr, c)
			return exitCode(2)
		},
		Version:               versionString(),
		PersistentPreRunE:     applyGlobalFlags,
		SilenceErrors:         true,
		DisableFlagsInUseLine: true,
		SilenceUsage:          true,
		CompletionOptions:     cobra.CompletionOptions{HiddenDefaultCmd: false},
	}
	root.SetVersionTemplate("{{.Version}}\n")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usagef("%v", err) })
	root.SetHelpFunc(func(c *cobra.Command, _ []string) { writeHelp(c.OutOrStdout(), c) })
	addGlobalFlags(root)
	root.AddCommand(newRunCommand(), newShutdownCommand(), newAttachCommand(), newDetachCommand(),
		newPauseCommand(), newResumeCommand(), newSnapshotCommand(), newHotplugCommand(),
		newLsCommand(), newImageCommand(), newXenstoreCommand(), newXenstoredCommand(),
		newWorkerCommand(), newVersionCommand())
	completeTree(root)
	return root
}

// completeTree adds now what cobra would add only while executing (help
// and version flags, the help and completion commands), so that the tree
// the docs are made from and the one that runs are the same.
func completeTree(root *cobra.Command) {
	root.InitDefaultVersionFlag()
	root.Flags().Lookup("version").Usage = "print the version, commit and Go release"
	root.InitDefaultCompletionCmd()
	root.InitDefaultHelpCmd()
	for _, c := range root.Commands() {
		switch c.Name() {
		case "completion":
			c.Use = "completion bash|zsh|fish|powershell"
			c.DisableFlagsInUseLine = true
			c.Short = "print the shell completion script (the packages ship bash's, zsh's and fish's)"
		case "help":
			c.DisableFlagsInUseLine = true
			c.Short = "a command's help (as COMMAND --help)"
		}
	}
	var helpFlags func(c *cobra.Command)
	helpFlags = func(c *cobra.Command) {
		c.InitDefaultHelpFlag()
		c.DisableFlagsInUseLine = true // each Use spells its flags out
		c.Flags().Lookup("help").Usage = "this help"
		for _, sub := range c.Commands() {
			helpFlags(sub)
		}
	}
	helpFlags(root)
}

func addGlobalFlags(root *cobra.Command) {
	f := root.PersistentFlags()
	f.StringVar(&global.stateDir, "state-dir", "", "the daemon's state directory, `DIR` (default $BLKTAP_STATE_DIR, else /run/blktap as root, else $XDG_RUNTIME_DIR/blktap)")
	f.StringVar(&global.xenstore, "xenstore", "", "the xenstored socket, `PATH` (default: the one the daemon uses; for run, a real one if reachable, else embedded)")
	f.StringVar(&global.logFormat, "log-format", "text", "how to log, `text|json` (kept in $BLKTAP_LOG_FORMAT for the workers)")
	f.StringVar(&global.logLevel, "log-level", "", "the least severe messages logged, `debug|info|warn|error` (default info, debug with $BLKTAP_DEBUG)")
	root.MarkPersistentFlagDirname("state-dir")
	root.MarkPersistentFlagFilename("xenstore")
	fixedChoices(root, "log-format", "text", "json")
	fixedChoices(root, "log-level", "debug", "info", "warn", "error")
}

// applyGlobalFlags checks the global flags and hands the logging ones to
// logsetup.New (and the workers) through the environment.
func applyGlobalFlags(c *cobra.Command, _ []string) error {
	flags := c.Flags()
	if flags.Changed("state-dir") && global.stateDir == "" {
		return usagef("--state-dir needs a directory")
	}
	switch global.logFormat {
	case "text", "json":
	default:
		return usagef("--log-format %q: want text or json", global.logFormat)
	}
	// run has always set the format for its workers, text unless told;
	// the other commands leave an inherited $BLKTAP_LOG_FORMAT alone.
	if flags.Changed("log-format") || c.Name() == "run" {
		os.Setenv("BLKTAP_LOG_FORMAT", global.logFormat)
	}
	if global.logLevel != "" {
		var l slog.Level
		if err := l.UnmarshalText([]byte(global.logLevel)); err != nil {
			return usagef("--log-level %q: want debug, info, warn or error", global.logLevel)
		}
		os.Setenv("BLKTAP_LOG_LEVEL", global.logLevel)
	}
	return nil
}

// fixedChoices makes the shells complete flag's value from choices.
func fixedChoices(c *cobra.Command, flag string, choices ...string) {
	c.RegisterFlagCompletionFunc(flag, cobra.FixedCompletions(choices, cobra.ShellCompDirectiveNoFileComp))
}

// imageFormats are the names -f, -F and -O take.
var imageFormats = []string{"raw", "qcow", "qcow2", "vhd", "vmdk"}

// formatFlag adds an image-format flag (-f FMT and the like) that the
// shells complete with the format names.
func formatFlag(c *cobra.Command, name, short, def, usage string) *string {
	p := c.Flags().StringP(name, short, def, usage)
	fixedChoices(c, name, imageFormats...)
	return p
}

// leaf makes a command whose Use is its whole synopsis, flags included,
// so that --help, usage errors, the man page and README show one text.
func leaf(use, short string) *cobra.Command {
	return &cobra.Command{Use: use, Short: short, DisableFlagsInUseLine: true}
}

// timed gives c a --timeout flag (def, usage) and runs run with its value:
// the commands that wait on the daemon.
func timed(c *cobra.Command, def time.Duration, usage string, run func([]string, time.Duration) error) *cobra.Command {
	timeout := c.Flags().Duration("timeout", def, usage)
	c.RunE = func(_ *cobra.Command, pos []string) error { return run(pos, *timeout) }
	return c
}

// writeHelp is every command's --help: its synopsis, what it does, its
// subcommands, its flags and the global flags.
func writeHelp(w io.Writer, c *cobra.Command) {
	if !c.HasParent() {
		writeRootHelp(w, c)
		return
	}
	fmt.Fprintf(w, "usage: %s\n", c.UseLine())
	if c.Long != "" {
		fmt.Fprintf(w, "\n%s\n", strings.TrimSpace(c.Long))
	} else if c.Short != "" {
		fmt.Fprintf(w, "\n%s\n", c.Short)
	}
	if c.HasAvailableSubCommands() {
		fmt.Fprintf(w, "\ncommands:\n")
		for _, sub := range c.Commands() {
			if sub.IsAvailableCommand() {
				fmt.Fprintf(w, "  %s\n      %s\n", sub.UseLine(), sub.Short)
			}
		}
	}
	if c.HasAvailableLocalFlags() {
		fmt.Fprintf(w, "\nflags:\n%s", flagUsages(c.LocalFlags()))
	}
	if c.HasAvailableInheritedFlags() {
		fmt.Fprintf(w, "\nglobal flags (before or after the command):\n%s", flagUsages(c.InheritedFlags()))
	}
}

// writeRootHelp is `blktap --help`: each command with its synopsis, the
// 2006 tools, and the global flags.
func writeRootHelp(w io.Writer, root *cobra.Command) {
	fmt.Fprintf(w, "usage: %s\n\ncommands:\n", rootSynopsis)
	for _, c := range root.Commands() {
		if c.IsAvailableCommand() || c.Name() == "help" {
			fmt.Fprintf(w, "  %s\n            %s\n", strings.TrimSpace(fmt.Sprintf("%-9s %s", c.Name(), synopsisArgs(c))), c.Short)
		}
	}
	fmt.Fprintf(w, "\nthe 2006 tools (links to this binary):\n")
	for _, s := range seedSynopses {
		fmt.Fprintf(w, "  %s\n", s)
	}
	fmt.Fprintf(w, "\nglobal flags (before or after the command):\n%s", flagUsages(root.PersistentFlags()))
	fmt.Fprintf(w, "%s", flagUsages(root.LocalNonPersistentFlags()))
	fmt.Fprintf(w, "\n`blktap COMMAND --help` for a command's own flags.\n")
}

// synopsisArgs is what follows the command's name in its synopsis.
func synopsisArgs(c *cobra.Command) string {
	_, rest, _ := strings.Cut(c.Use, " ")
	return rest
}

// flagUsages lists fs's flags one a line, GNU style: a boolean is just its
// name (pflag would add "[=true|false]" to each).
func flagUsages(fs *pflag.FlagSet) string {
	var b strings.Builder
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Hidden {
			return
		}
		name := "    --" + f.Name
		if f.Shorthand != "" {
			name = "-" + f.Shorthand + ", --" + f.Name
		}
		varname, usage := pflag.UnquoteUsage(f)
		if f.Value.Type() != "bool" {
			name += " " + varname
			if d := f.DefValue; d != "" && d != "[]" && d != "0s" {
				usage += " (default " + d + ")"
			}
		}
		if len(name) > 24 {
			fmt.Fprintf(&b, "  %s\n  %-24s %s\n", name, "", usage)
		} else {
			fmt.Fprintf(&b, "  %-24s %s\n", name, usage)
		}
	})
	return b.String()
}
