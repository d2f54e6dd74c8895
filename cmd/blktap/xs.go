package main

import (
	"context"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/blktap-go/blktap/reconciler"
	"github.com/blktap-go/blktap/xenstore"
	"github.com/blktap-go/blktap/xenstore/xscli"
	"github.com/spf13/cobra"
)

// exitCode carries a subcommand's own exit status through run.
type exitCode int

func (e exitCode) Error() string { return "" }

// xenstoreSocket picks the xenstored the daemon uses: --xenstore (or
// --socket) if given, else the one recorded in the state directory, else
// a real one.
func xenstoreSocket(stateDir, explicit string) string {
	if explicit != "" {
		return explicit
	}
	if p := recordedXenstore(stateDir); p != "" {
		return p
	}
	return xenstore.DefaultPath()
}

// recordedXenstore is the xenstored the daemon of stateDir recorded, or "".
func recordedXenstore(stateDir string) string {
	b, err := os.ReadFile(filepath.Join(stateDir, reconciler.XenstorePathFile))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func newXenstoreCommand() *cobra.Command {
	c := leaf("xenstore read|write|ls|list|rm|mkdir|chmod|exists|watch ...",
		"a xenstore client for either xenstored (`blktap xenstore` alone for help)")
	// The client has its own flags (xenstore-ls -f, ...): they are its to
	// parse, and the global ones are picked out below.
	c.DisableFlagParsing = true
	c.RunE = func(c *cobra.Command, args []string) error {
		if len(args) == 1 && (args[0] == "--help" || args[0] == "-h") {
			writeHelp(c.OutOrStdout(), c)
			return nil
		}
		return cmdXenstore(args)
	}
	return c
}

// cmdXenstore is `blktap xenstore [--state-dir DIR] [--xenstore SOCK] CMD ...`.
// The global flags may stand anywhere; the rest goes to the client.
func cmdXenstore(args []string) error {
	stateDir, sock := defaultStateDir(), ""
	var rest []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		name, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || !slices.Contains([]string{"state-dir", "xenstore", "socket", "log-format", "log-level"}, name) {
			rest = append(rest, a)
			continue
		}
		if !hasVal {
			if i+1 >= len(args) {
				return usagef("%s needs a value", a)
			}
			i++
			val = args[i]
		}
		switch name {
		case "state-dir":
			stateDir = val
		case "xenstore", "socket":
			sock = val
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if code := xscli.Xenstore(ctx, append([]string{"--socket", xenstoreSocket(stateDir, sock)}, rest...), os.Stdout, os.Stderr); code != 0 {
		return exitCode(code)
	}
	return nil
}
