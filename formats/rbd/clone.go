package rbd

import (
	"fmt"
	"strings"
)

// CloneTarget reads what `blktap snapshot` names for a disk on the rbd
// image parent: where the disk goes on after the snapshot. arg is either
//
//	NAME                       snapshot PARENT@NAME, clone PARENT-NAME beside it
//	rbd:POOL[/NS]/CLONE[@NAME] snapshot PARENT@NAME (NAME defaults to
//	                           CLONE), clone POOL[/NS]/CLONE
//
// The clone lives in the parent's cluster, so it takes the parent's
// connection options; arg may not carry its own.
func CloneTarget(parent Spec, arg string) (snap string, clone Spec, err error) {
	if parent.Snap != "" {
		return "", Spec{}, fmt.Errorf("%w: rbd:%s is a snapshot, which is read-only and has no snapshots of its own", ErrBadSpec, parent.Name())
	}
	if !strings.HasPrefix(arg, "rbd:") {
		if arg == "" || strings.ContainsAny(arg, "/@:\\") {
			return "", Spec{}, fmt.Errorf("%w: snapshot name %q: give a bare NAME (no '/', '@', ':' or '\\') or rbd:POOL/CLONE[@NAME]", ErrBadSpec, arg)
		}
		snap = arg
		clone = parent
		clone.Image = parent.Image + "-" + arg
	} else {
		named, err := ParseSpec(arg)
		if err != nil {
			return "", Spec{}, err
		}
		if named.Name() != named.String() {
			return "", Spec{}, fmt.Errorf("%w: %q: the clone is made in the disk's own cluster; leave out conf=, id= and the other options", ErrBadSpec, arg)
		}
		snap = named.Snap
		if snap == "" {
			snap = named.Image
		}
		clone = parent
		clone.Pool, clone.Namespace, clone.Image = named.Pool, named.Namespace, named.Image
	}
	// The names must be ones the cluster takes; Parse says so at once.
	check := parent
	check.Snap = snap
	if _, err := ParseSpec(check.String()); err != nil {
		return "", Spec{}, err
	}
	if _, err := ParseSpec(clone.String()); err != nil {
		return "", Spec{}, err
	}
	if clone.Pool == parent.Pool && clone.Namespace == parent.Namespace && clone.Image == parent.Image {
		return "", Spec{}, fmt.Errorf("%w: the clone cannot be the image itself (rbd:%s)", ErrBadSpec, clone.Name())
	}
	return snap, clone, nil
}
