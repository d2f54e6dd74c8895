package main

// `blktap image snapshot`: qemu-img snapshot on qcow2 internal snapshots.
// Not to be confused with `blktap snapshot` (pause.go), which makes a live
// disk the base of a new overlay file.

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/formats/qcow2"
	"github.com/spf13/pflag"
)

// Registered from here, after the other image tools, so that the image
// commands others add do not touch the same lines of image.go.
func init() {
	imageCommands = append(imageCommands, struct {
		use, short, long string
		setup            func(fs *pflag.FlagSet) func(pos []string) error
	}{
		"snapshot [-q] [-f FMT] [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] FILE",
		"list, create, apply or delete a qcow2 image's internal snapshots, or an rbd image's snapshots",
		"-l lists; -c creates SNAPSHOT (names need not be unique); -a reverts the disk to the snapshot whose ID, " +
			"or else name, is SNAPSHOT; -d deletes the first snapshot named SNAPSHOT. " +
			"Refused while anyone (a blktap worker, qemu) has the image open for writing. " +
			"On an rbd: image they are its RBD snapshots (rbd snap ls, create, rollback, rm); names are unique there, " +
			"-c and -d work while a worker writes the image (the snapshot is crash-consistent) and -a is refused. " +
			"Not `blktap snapshot`, which puts a live disk under a new overlay file.",
		imageSnapshot,
	})
}

func imageSnapshot(fs *pflag.FlagSet) func(pos []string) error {
	list := fs.BoolP("list", "l", false, "list the snapshots")
	apply := fs.StringP("apply", "a", "", "revert the disk to `SNAPSHOT` (ID or name)")
	create := fs.StringP("create", "c", "", "create `SNAPSHOT` of the disk as it is")
	del := fs.StringP("delete", "d", "", "delete `SNAPSHOT` (by name)")
	fs.BoolP("quiet", "q", false, "quiet (there is nothing to silence; taken as qemu-img takes it)")
	fmtName := fs.StringP("format", "f", "", "the image's `FMT` (default: probe); qcow2 or rbd")
	return func(pos []string) error {
		actions := 0
		for _, name := range []string{"list", "apply", "create", "delete"} {
			if fs.Changed(name) {
				actions++
			}
		}
		if actions > 1 {
			return usagef("-l, -a, -c and -d do not mix")
		}
		if len(pos) != 1 {
			return usagef("want FILE")
		}
		if actions == 0 {
			return nil // qemu-img does nothing, successfully
		}
		if isRBDTarget(pos[0], *fmtName) {
			action, snap := "list", ""
			switch {
			case fs.Changed("create"):
				action, snap = "create", *create
			case fs.Changed("apply"):
				action, snap = "apply", *apply
			case fs.Changed("delete"):
				action, snap = "delete", *del
			}
			return rbdImageSnapshot(os.Stdout, pos[0], action, snap)
		}
		img, err := openForSnapshots(pos[0], *fmtName, *list)
		if err != nil {
			return err
		}
		switch {
		case *list:
			err = printSnapshotList(os.Stdout, formats.DescribeQemu(img, pos[0]).Snapshots)
		case fs.Changed("create"):
			_, err = img.CreateSnapshot(*create, time.Now())
			err = snapshotError("create", *create, err)
		case fs.Changed("apply"):
			err = snapshotError("apply", *apply, img.ApplySnapshot(*apply))
		case fs.Changed("delete"):
			err = snapshotError("delete", *del, img.DeleteSnapshot(*del))
		}
		if cerr := img.Close(); err == nil {
			err = cerr
		}
		return err
	}
}

// openForSnapshots opens a qcow2 image, read-only to list; writable,
// which fails while another process writes it, to change.
func openForSnapshots(path, format string, readOnly bool) (*qcow2.Image, error) {
	var err error
	if format == "" {
		if format, err = formats.Probe(path); err != nil {
			return nil, err
		}
	}
	if format, err = formats.Normalize(format); err != nil {
		return nil, usagef("%v", err)
	}
	if format != "qcow2" {
		return nil, fmt.Errorf("%s: %w: %s images have no internal snapshots (qcow2 has)", path, formats.ErrUnsupported, format)
	}
	img, err := openProbed(path, format, readOnly)
	if err != nil {
		if errors.Is(err, formats.ErrLocked) {
			return nil, fmt.Errorf("%w (is a blktap worker or qemu using it?)", err)
		}
		return nil, err
	}
	return img.(*qcow2.Image), nil
}

// snapshotError words a failure as qemu-img does: which action, which
// snapshot, why.
func snapshotError(action, name string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("could not %s snapshot '%s': %w", action, name, err)
}
