package reconciler

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"strconv"
	"time"
)

// restartFacts is what the daemon records of something it restarts after
// it stopped on its own (a worker, the local frontend's ring), for Plan,
// which decides the delay (backoffPolicy): the daemon only observes.
type restartFacts struct {
	startedAt time.Time     // the current one's start; zero: never started by the daemon
	lastWait  time.Duration // the delay that start waited (0: it was no restart)
	stoppedAt time.Time     // the last stop on its own
	served    time.Duration // how long the one that stopped had run
}

// started records a start after a delay of wait (0: no restart, whose
// stop will count as a fresh one).
func (r *restartFacts) started(now time.Time, wait time.Duration) {
	r.startedAt, r.lastWait = now, wait
}

// stopped records a stop on its own. What the daemon never started ran
// for ever as far as the backoff goes: its stop is a fresh one.
func (r *restartFacts) stopped(now time.Time) {
	r.stoppedAt, r.served = now, time.Duration(math.MaxInt64)
	if !r.startedAt.IsZero() {
		r.served = now.Sub(r.startedAt)
	}
}

// backoff is the facts for Plan, "since" by the clock at now.
func (r *restartFacts) backoff(now time.Time) Backoff {
	return Backoff{Served: Nanos(r.served), LastWait: Nanos(r.lastWait), Since: Nanos(now.Sub(r.stoppedAt))}
}

// noticeExit folds a worker that exited on its own into the device's
// state: nothing it served is served any more, and Plan decides when a new
// one starts from the facts recorded here.
func (d *Daemon) noticeExit(dev *device, log *slog.Logger) {
	if dev.worker.proc == nil {
		return
	}
	select {
	case <-dev.worker.proc.Done():
	default:
		if dev.rings.ring {
			noticeRingFault(dev, log)
		}
		return
	}
	if !dev.worker.stopping {
		dev.retry.restarts++
		dev.retry.workerRestart.stopped(time.Now())
		dev.worker.exited = fmt.Sprintf("worker %d exited: %v", dev.worker.proc.Pid(), dev.worker.proc.ExitErr())
		dev.st.lastErr = dev.worker.exited
		log.Error("worker exited", "pid", dev.worker.proc.Pid(), "err", dev.worker.proc.ExitErr(), "restarts", dev.retry.restarts,
			"served", dev.retry.workerRestart.served.Round(time.Millisecond))
	}
	d.dropWorker(dev, false)
}

// waitEffect carries out an action whose delay Plan decided (Action.Wait).
type waitEffect func(d *Daemon, ctx context.Context, dev *device, s snapshot, wait time.Duration, log *slog.Logger) error

// waitEffects are the effects of the actions that carry a delay; apply
// looks here before effects.
var waitEffects = map[ActionKind]waitEffect{
	ActAwaitRestart:         (*Daemon).awaitRestart,
	ActRestartWorker:        (*Daemon).restartWorker,
	ActAwaitFrontendRestart: (*Daemon).awaitFrontendRestart,
	ActFrontendRestart:      (*Daemon).frontendRestart,
}

// awaitRestart requeues the device when a crashed worker's delay runs out;
// the status says restarting meanwhile.
func (d *Daemon) awaitRestart(ctx context.Context, dev *device, s snapshot, wait time.Duration, log *slog.Logger) error {
	dev.retry.restartDue = time.Now().Add(wait)
	return &retryAt{dev.retry.restartDue}
}

// restartWorker starts a new worker after one exited, wait after.
func (d *Daemon) restartWorker(ctx context.Context, dev *device, s snapshot, wait time.Duration, log *slog.Logger) error {
	if err := d.startWorker(ctx, dev, s, log); err != nil {
		return err
	}
	dev.retry.workerRestart.lastWait = wait // startWorker recorded a start with no delay
	log.Info("worker restarted", "after", wait, "restarts", dev.retry.restarts)
	return nil
}

// awaitFrontendRestart requeues the device when the local frontend's
// delay runs out.
func (d *Daemon) awaitFrontendRestart(ctx context.Context, dev *device, s snapshot, wait time.Duration, log *slog.Logger) error {
	return retryIn(wait)
}

// frontendRestart sends a Closed local frontend back to Initialising.
func (d *Daemon) frontendRestart(ctx context.Context, dev *device, s snapshot, wait time.Duration, log *slog.Logger) error {
	if err := d.writeIfPresent(ctx, s.fePath, "state", strconv.Itoa(int(StateInitialising))); err != nil {
		return err
	}
	dev.retry.ringRestart.started(time.Now(), wait)
	log.Info("local frontend starting over", "after", dev.rings.ringLost, "waited", wait)
	return nil
}
