package main

import (
	"context"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/blktap-go/blktap/reconciler"
	"github.com/blktap-go/blktap/xenstore"
	"github.com/blktap-go/blktap/xenstore/xscli"
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

// cmdXenstore is `blktap xenstore [--state-dir DIR] [--xenstore SOCK] CMD ...`.
// The daemon's flags may stand anywhere; the rest goes to the client.
func cmdXenstore(args []string) error {
	stateDir, sock := defaultStateDir(), ""
	var rest []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		name, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || (name != "state-dir" && name != "xenstore" && name != "socket") {
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
		if name == "state-dir" {
			stateDir = val
		} else {
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
