package reconciler

import (
	"context"
	"errors"
	"log/slog"

	"github.com/blktap-go/blktap/tapengine/frontend"
	"github.com/blktap-go/blktap/tapengine/nbd"
	"github.com/blktap-go/blktap/tapengine/worker"
)

// trimGuestWhenIdle gives a guest view's memory back after each burst of
// I/O followed by worker.IdleTrim without any (the worker does the same
// for its own heap): the local frontend's idle grant pages, which a 1M
// read touches in full and which otherwise stay resident, up to 16 MiB,
// in both the daemon and the worker until the disk goes; then the
// daemon's own free heap (the guest view's NBD payload buffers). It runs
// until ctx (the guest view's) is done.
//
// Activity is read from the guest view's NBD counters: a few atomic loads
// per poll, nothing on the request path.
func trimGuestWhenIdle(ctx context.Context, srv *nbd.Server, lf *frontend.Frontend, log *slog.Logger) {
	activity := func() (uint64, bool) {
		s := srv.Stats()
		return s.Reads + s.Writes + s.Flushes + s.Trims + s.Zeroes + s.BlockStatus + s.Errors, false
	}
	worker.TrimWhenIdle(ctx, worker.IdleTrim, activity, srv.Bell, func() {
		if err := lf.Trim(); err != nil {
			if !errors.Is(err, frontend.ErrClosed) {
				log.Warn("guest view: trimming idle grant pages", "err", err)
			}
			return
		}
		worker.ReleaseMemory()
		log.Debug("guest view: idle after I/O; grant pages and heap memory returned to the system")
	})
}
