package main

import (
	"context"
	"flag"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/blktap-go/blktap/config"
	"github.com/blktap-go/blktap/reconciler"
)

// findDevice returns the key of the disk VDEV of domain DOMID, under
// whichever backend kind declares it.
func findDevice(ctx context.Context, stateDir, xsPath, dom, vdev string) (reconciler.Key, error) {
	domid, err := parseDomid(dom)
	if err != nil {
		return reconciler.Key{}, err
	}
	devid, err := config.ParseVdev(strings.TrimPrefix(vdev, "/dev/"))
	if err != nil {
		return reconciler.Key{}, usagef("VDEV: %v", err)
	}
	xs, err := dialXenstore(ctx, stateDir, xsPath)
	if err != nil {
		return reconciler.Key{}, err
	}
	defer xs.Close()
	for _, kind := range []string{reconciler.KindVBD3, reconciler.KindTap, reconciler.KindVBD} {
		k := reconciler.Key{Kind: kind, Domid: domid, Devid: devid}
		if _, err := xs.Read(ctx, k.BackendPath(0)); err == nil {
			return k, nil
		}
	}
	return reconciler.Key{}, fmt.Errorf("no disk %s attached to domain %d", vdev, domid)
}

// cmdPause: blktap pause DOMID VDEV
func cmdPause(args []string) error {
	fs := flag.NewFlagSet("pause", flag.ContinueOnError)
	stateDir, xsPath := stateFlags(fs)
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 2 {
		return usagef("want DOMID VDEV")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	k, err := findDevice(ctx, *stateDir, *xsPath, pos[0], pos[1])
	if err != nil {
		return err
	}
	return reconciler.DeviceCall(ctx, *stateDir, k, "pause", reconciler.DeviceOp{})
}

// cmdResume: blktap resume DOMID VDEV [--image TYPE:PATH]
func cmdResume(args []string) error {
	fs := flag.NewFlagSet("resume", flag.ContinueOnError)
	stateDir, xsPath := stateFlags(fs)
	img := fs.String("image", "", "switch to this image (TYPE:PATH, same size) instead of reopening the old one")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 2 {
		return usagef("want DOMID VDEV [--image TYPE:PATH]")
	}
	var op reconciler.DeviceOp
	if *img != "" {
		if op.Format, op.Path, err = imageArg(*img); err != nil {
			return fmt.Errorf("--image: %w", err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	k, err := findDevice(ctx, *stateDir, *xsPath, pos[0], pos[1])
	if err != nil {
		return err
	}
	return reconciler.DeviceCall(ctx, *stateDir, k, "resume", op)
}

// cmdSnapshot: blktap snapshot DOMID VDEV NEWFILE [-f FMT]
func cmdSnapshot(args []string) error {
	fs := flag.NewFlagSet("snapshot", flag.ContinueOnError)
	stateDir, xsPath := stateFlags(fs)
	format := fs.String("f", "qcow2", "the overlay's format (qcow2, qcow, vhd, vmdk)")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 3 {
		return usagef("want DOMID VDEV NEWFILE")
	}
	path, err := filepath.Abs(pos[2])
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	k, err := findDevice(ctx, *stateDir, *xsPath, pos[0], pos[1])
	if err != nil {
		return err
	}
	return reconciler.DeviceCall(ctx, *stateDir, k, "snapshot", reconciler.DeviceOp{Format: *format, Path: path})
}
