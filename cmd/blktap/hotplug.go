package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/blktap-go/blktap/reconciler"
	"github.com/blktap-go/blktap/xenstore"
)

// cmdHotplug is what libxl runs, through scripts/xen/block-blktap, for a
// disk whose backend the daemon serves. libxl runs `add` once the backend
// is in InitWait and fails the domain's creation on a non-zero exit, so
// add waits until the daemon has the image open and says why when it
// cannot; the daemon holds Connected until add has written
// hotplug-status. `remove` runs after the backend reached Closed: the
// daemon follows xenstore on its own, so nothing is left to do.
func cmdHotplug(args []string) error {
	fs := flag.NewFlagSet("hotplug", flag.ContinueOnError)
	stateDir, xsPath := stateFlags(fs)
	timeout := fs.Duration("timeout", 30*time.Second, "how long add waits for the daemon to open the image")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() < 1 {
		return usagef("want add or remove")
	}
	action := fs.Arg(0)
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
	ctx, cancel := context.WithTimeout(context.Background(), *timeout+5*time.Second)
	defer cancel()
	err := hotplugAdd(ctx, *stateDir, *xsPath, bePath, *timeout)
	if err != nil {
		fmt.Fprintf(os.Stderr, "block-blktap: %s: %v\n", bePath, err)
		return exitCode(1)
	}
	return nil
}

// daemonAnswerBy bounds how long add waits for the daemon's API, counted
// from this process's start: a host whose daemon is down or hung fails the
// domain's creation in seconds, with the socket named, not after libxl's
// own timeout. blktap(8) promises 5 s for the whole script; starting the
// process takes part of that, 1.6 s under make xen-test's emulation, so
// the wait is what is left of 4 s since the start, and at least 1 s.
const daemonAnswerBy = 4 * time.Second

func daemonAnswerWithin() time.Duration {
	d := daemonAnswerBy - sinceProcessStart()
	if d < time.Second {
		d = time.Second
	}
	return d
}

// sinceProcessStart is how long ago the kernel started this process
// (/proc/self/stat's starttime against /proc/uptime; 0 if unknown). Linux
// counts starttime in USER_HZ ticks, 100 a second on every architecture.
func sinceProcessStart() time.Duration {
	stat, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return 0
	}
	up, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return 0
	}
	// Fields after the command name, which may hold spaces: starttime,
	// field 22, is the 20th.
	f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
	uf := strings.Fields(string(up))
	if len(f) < 20 || len(uf) < 1 {
		return 0
	}
	ticks, err1 := strconv.ParseFloat(f[19], 64)
	now, err2 := strconv.ParseFloat(uf[0], 64)
	if err1 != nil || err2 != nil || now < ticks/100 {
		return 0
	}
	return time.Duration((now - ticks/100) * float64(time.Second))
}

func hotplugAdd(ctx context.Context, stateDir, xsPath, bePath string, timeout time.Duration) error {
	apiSock := filepath.Join(stateDir, reconciler.APISocket)
	actx, cancel := context.WithTimeout(ctx, daemonAnswerWithin())
	_, err := reconciler.FetchStats(actx, stateDir)
	cancel()
	if err != nil {
		return fmt.Errorf("the blktap daemon is not answering at %s (is `blktap run` running? systemctl start blktap): %v", apiSock, err)
	}
	xs, err := dialXenstore(ctx, stateDir, xsPath)
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
