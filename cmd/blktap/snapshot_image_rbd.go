package main

// `blktap image snapshot` on an rbd: image: the image's RBD snapshots,
// listed as qemu-img lists them through its rbd driver.

import (
	"io"
	"strings"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/formats/rbd"
)

// isRBDTarget: the image named is an rbd image (by its name, or -f rbd).
func isRBDTarget(path, format string) bool {
	if strings.HasPrefix(path, "rbd:") {
		return true
	}
	name, err := formats.Normalize(format)
	return err == nil && name == "rbd"
}

// rbdImageSnapshot runs one of -l, -c, -a, -d (action) on an rbd image.
// -a refuses an image a worker has open for writing (rbd.RollbackSnapshot).
func rbdImageSnapshot(w io.Writer, path, action, snap string) error {
	path = strings.TrimPrefix(path, "rbd:") // the messages add it back
	switch action {
	case "list":
		snaps, err := rbd.Snapshots(path)
		if err != nil {
			return err
		}
		return printSnapshotList(w, qemuRBDSnapshots(snaps))
	case "create":
		return snapshotError("create", snap, rbd.CreateSnapshot(path, snap))
	case "apply":
		return snapshotError("apply", snap, rbd.RollbackSnapshot(path, snap))
	case "delete":
		return snapshotError("delete", snap, rbd.DeleteSnapshot(path, snap))
	}
	return nil
}

// qemuRBDSnapshots describes RBD snapshots as qemu's rbd driver does:
// the name is the ID too (RBD's numeric IDs are not the ones qemu-img
// -a takes), the size is the image's when the snapshot was taken, and
// no date, VM clock or instruction count is recorded (qemu prints 0).
func qemuRBDSnapshots(snaps []rbd.SnapInfo) []formats.QemuSnapshot {
	out := make([]formats.QemuSnapshot, 0, len(snaps))
	for _, s := range snaps {
		out = append(out, formats.QemuSnapshot{ID: s.Name, Name: s.Name, VMStateSize: uint64(s.Size), ICount: new(uint64)})
	}
	return out
}
