package main

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/blktap-go/blktap/config"
	"github.com/blktap-go/blktap/reconciler"
	"github.com/spf13/cobra"
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

func newPauseCommand() *cobra.Command {
	c := leaf("pause DOMID VDEV", "hold the disk's I/O, flush and close its image (resume continues)")
	c.RunE = func(_ *cobra.Command, pos []string) error { return cmdPause(pos) }
	return c
}

// cmdPause: blktap pause DOMID VDEV
func cmdPause(pos []string) error {
	stateDir, xsPath := daemonFlags()
	if len(pos) != 2 {
		return usagef("want DOMID VDEV")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	k, err := findDevice(ctx, stateDir, xsPath, pos[0], pos[1])
	if err != nil {
		return err
	}
	return reconciler.DeviceCall(ctx, stateDir, k, "pause", reconciler.DeviceOp{})
}

func newResumeCommand() *cobra.Command {
	c := leaf("resume DOMID VDEV [--image TYPE:PATH]", "reopen the image, or switch to another of the same size")
	img := c.Flags().String("image", "", "switch to this image, `TYPE:PATH` of the same size, instead of reopening the old one")
	c.RunE = func(_ *cobra.Command, pos []string) error { return cmdResume(pos, *img) }
	return c
}

// cmdResume: blktap resume DOMID VDEV [--image TYPE:PATH]
func cmdResume(pos []string, img string) error {
	stateDir, xsPath := daemonFlags()
	var err error
	if len(pos) != 2 {
		return usagef("want DOMID VDEV [--image TYPE:PATH]")
	}
	var op reconciler.DeviceOp
	if img != "" {
		if op.Format, op.Path, err = imageArg(img); err != nil {
			return fmt.Errorf("--image: %w", err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	k, err := findDevice(ctx, stateDir, xsPath, pos[0], pos[1])
	if err != nil {
		return err
	}
	return reconciler.DeviceCall(ctx, stateDir, k, "resume", op)
}

func newSnapshotCommand() *cobra.Command {
	c := leaf("snapshot DOMID VDEV NEWFILE [-f FMT]", "live: the image becomes the base of a new overlay NEWFILE (rbd: a snapshot and clone)")
	format := formatFlag(c, "format", "f", "", "the overlay's format, `FMT`: qcow2 (default), qcow, vhd, vmdk; an rbd disk's NEWFILE is NAME or rbd:POOL/CLONE[@NAME]")
	c.RunE = func(_ *cobra.Command, pos []string) error { return cmdSnapshot(pos, *format) }
	return c
}

// cmdSnapshot: blktap snapshot DOMID VDEV NEWFILE [-f FMT]
func cmdSnapshot(pos []string, format string) error {
	stateDir, xsPath := daemonFlags()
	if len(pos) != 3 {
		return usagef("want DOMID VDEV NEWFILE")
	}
	path, err := filepath.Abs(pos[2])
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	k, err := findDevice(ctx, stateDir, xsPath, pos[0], pos[1])
	if err != nil {
		return err
	}
	return reconciler.DeviceCall(ctx, stateDir, k, "snapshot", reconciler.DeviceOp{Format: format, Path: path, Name: pos[2]})
}
