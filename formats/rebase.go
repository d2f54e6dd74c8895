package formats

import (
	"context"

	"github.com/blktap-go/blktap/formats/internal/backing"
)

// RebaseOptions tune Rebase.
type RebaseOptions = backing.Options

// Rebase makes name (of format) img's backing file, as qemu-img rebase.
// img is open for writing over its current backing chain; newBacking is
// the image name opens, read-only, or nil when name is "" (the image
// becomes standalone) or in unsafe mode.
//
// In safe mode the content a guest reads is unchanged: every range img
// does not allocate itself where the old chain and newBacking differ is
// first written into img, img is flushed, and only then is the header
// rewritten, so a crash at any point leaves img reading the same content.
// qcow2, qcow and VHD differencing images can be rebased; other formats
// get ErrUnsupported before anything is written.
func Rebase(ctx context.Context, img, newBacking Image, name, format string, opt RebaseOptions) error {
	return backing.Rebase(ctx, img, newBacking, name, format, opt)
}

// Commit writes every range top's chain allocates above base into base,
// as qemu-img commit: base is the image at depth in top's chain (1: top's
// own backing file), opened for writing as part of that chain. base is
// flushed, and then, with empty, top is emptied so it reads base through
// (qcow2, qcow and VHD differencing disks can be emptied).
func Commit(ctx context.Context, top, base Image, depth int, empty bool, progress func(done, total int64)) error {
	return backing.Commit(ctx, top, base, depth, empty, progress)
}
