package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/blktap-go/blktap/reconciler"
	"github.com/blktap-go/blktap/xenstore"
	"github.com/spf13/cobra"
)

// cmdHotplug is what libxl runs, through scripts/xen/block-blktap, for a
// disk whose backend the daemon serves. libxl runs `add` once the backend
// is in InitWait and fails the domain's creation on a non-zero exit, so
// add waits until the daemon has the image open and says why when it
// cannot; the daemon holds Connected until add has written
// hotplug-status. `remove` runs after the backend reached Closed: the
// daemon follows xenstore on its own, so nothing is left to do.
func newHotplugCommand() *cobra.Command {
	return timed(leaf("hotplug add|remove [--timeout 30s]", "libxl's hotplug script for disks the daemon serves (scripts/xen/block-blktap; needs XENBUS_PATH)"),
		30*time.Second, "how long add waits for the daemon to open the image", cmdHotplug)
}

func cmdHotplug(pos []string, timeout time.Duration) error {
	stateDir, xsPath := daemonFlags()
	if len(pos) < 1 {
		return usagef("want add or remove")
	}
	action := pos[0]
	switch action {
	case "remove", "offline":
		return nil
	case "add", "online":
	default:
		return usagef("action %q: want add or remove", action)
	}
	bePath := os.Getenv("XENBUS_PATH")
	if bePath == "" {
		return usagef("XENBUS_PATH is not set (libxl sets it when it runs a hotplug script)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout+5*time.Second)
	defer cancel()
	err := hotplugAdd(ctx, stateDir, xsPath, bePath, timeout)
	if err != nil {
		fmt.Fprintf(os.Stderr, "block-blktap: %s: %v\n", bePath, err)
		return exitCode(1)
	}
	return nil
}

// daemonReachWithin bounds how long add tries to connect to the daemon's
// API socket: a host whose daemon is down (no socket, or nobody listening)
// fails the domain's creation at once, with the socket named, not after
// libxl's own timeout (blktap(8) promises 5 s for the whole script). A
// daemon that accepts the connection is running, and gets add's whole
// timeout to answer: under make xen-test's emulation a busy daemon took
// over 5 s, and failing it then failed a guest's disk the daemon would
// have served.
const daemonReachWithin = 2 * time.Second

// requireDaemon fails unless the daemon serving stateDir answers its API.
// Clients that write to xenstore ask first: without a daemon nothing acts
// on what they write, so they would wait out their timeout and leave a
// half-made device behind for the next attach to trip over.
func requireDaemon(ctx context.Context, stateDir string, answerWithin time.Duration) error {
	apiSock := filepath.Join(stateDir, reconciler.APISocket)
	conn, err := net.DialTimeout("unix", apiSock, daemonReachWithin)
	if err != nil {
		return fmt.Errorf("the blktap daemon is not running at %s (is `blktap run` running? systemctl start blktap; %s): %v",
			apiSock, stateDirHint(stateDir), err)
	}
	conn.Close()
	actx, cancel := context.WithTimeout(ctx, answerWithin)
	defer cancel()
	if err := reconciler.Ping(actx, stateDir); err != nil {
		return fmt.Errorf("the blktap daemon at %s did not answer within %v: %v", apiSock, answerWithin, err)
	}
	return nil
}

// daemonXenstore checks that the daemon answers (requireDaemon) and then
// connects to its xenstored: what every command that declares or removes
// a disk does first.
func daemonXenstore(ctx context.Context, stateDir, xsPath string, answerWithin time.Duration) (*xenstore.Client, error) {
	if err := requireDaemon(ctx, stateDir, answerWithin); err != nil {
		return nil, err
	}
	return dialXenstore(ctx, stateDir, xsPath)
}

// stateDirHint names the state directory a client used and how to name
// another: a daemon run with its own --state-dir is invisible otherwise.
func stateDirHint(stateDir string) string {
	return fmt.Sprintf("state directory %s; name the daemon's with --state-dir or BLKTAP_STATE_DIR", stateDir)
}

func hotplugAdd(ctx context.Context, stateDir, xsPath, bePath string, timeout time.Duration) error {
	xs, err := daemonXenstore(ctx, stateDir, xsPath, timeout)
	if err != nil {
		return err
	}
	defer xs.Close()
	if !strings.HasPrefix(bePath, "/") {
		bePath = "/local/domain/" + ownDomid(ctx, xs) + "/" + bePath
	}
	read := func(key string) string {
		v, _ := xs.Read(ctx, bePath+"/"+key)
		return v
	}
	report := func(msg string) error {
		// Where libxl looks (libxl_device.c reads hotplug-error) and what
		// xl prints when the script fails.
		xs.Write(ctx, bePath+"/hotplug-error", msg)
		xs.Write(ctx, bePath+"/hotplug-status", "error")
		return errors.New(msg)
	}
	deadline := time.Now().Add(timeout)
	for {
		if _, err := xs.Read(ctx, bePath); errors.Is(err, xenstore.ErrNotFound) {
			return fmt.Errorf("backend %s is gone", bePath)
		}
		phase := read("blktap/phase")
		switch phase {
		case reconciler.PhaseWaiting, reconciler.PhaseConnected, reconciler.PhasePaused:
			return xs.Write(ctx, bePath+"/hotplug-status", "connected")
		case reconciler.PhaseFailed:
			msg := read("blktap/error")
			if msg == "" {
				msg = "the daemon cannot serve " + read("params")
			}
			return report(msg)
		}
		if time.Now().After(deadline) {
			why := ""
			if e := read("blktap/error"); e != "" {
				why = ": " + e
			}
			return report(fmt.Sprintf("the daemon has not opened %s within %v (phase %q)%s", read("params"), timeout, phase, why))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// ownDomid is the domain this runs in (a driver domain serves its own
// backends); dom0 when xenstored does not say.
func ownDomid(ctx context.Context, xs *xenstore.Client) string {
	if v, err := xs.Read(ctx, "domid"); err == nil && v != "" {
		return v
	}
	return "0"
}
