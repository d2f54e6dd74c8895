package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/blktap-go/blktap/reconciler"
	"github.com/spf13/cobra"
)

// cmdShutdown asks the running daemon to flush and close every disk and
// exit, and waits until it has. A plain SIGTERM (systemctl stop) leaves
// the disks served instead.
func newShutdownCommand() *cobra.Command {
	return timed(leaf("shutdown [--timeout 5m]", "flush and close every disk, stop the daemon (host shutdown)"),
		5*time.Minute, "give up waiting after this long", cmdShutdown)
}

func cmdShutdown(pos []string, timeout time.Duration) error {
	if len(pos) > 0 {
		return usagef("unexpected argument %q", pos[0])
	}
	sd, err := filepath.Abs(defaultStateDir())
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	rep, err := reconciler.Shutdown(ctx, sd)
	if err != nil {
		return err
	}
	// The disks are closed; wait for the process itself to go, so that
	// whoever runs us next (a host's shutdown) finds it gone.
	for ctx.Err() == nil {
		if processGone(rep.Pid) {
			fmt.Printf("closed %d disks; daemon %d exited\n", rep.Closed, rep.Pid)
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	fmt.Fprintf(os.Stderr, "closed %d disks, but daemon %d has not exited after %v\n", rep.Closed, rep.Pid, timeout)
	return exitCode(1)
}

// processGone reports whether pid has exited: no such process, or a zombie
// its parent has not reaped yet (an adopted worker's parent is init).
func processGone(pid int) bool {
	if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
		return true
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return errors.Is(err, os.ErrNotExist)
	}
	// pid (comm) STATE ...: comm may hold spaces and parentheses.
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] == 'Z' || s[i+2] == 'X'
	}
	return false
}
