package ring

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/tapengine/blkif"
)

// maxIndirectSegments is what 8 indirect pages can describe.
const maxIndirectSegments = blkif.IndirectPagesMax * blkif.SegmentsPerIndirect

// Serve runs the backend loop for one ring until ctx is done or the
// frontend turns hostile.
//
// The loop owns a locked OS thread: it sleeps in epoll (edge-triggered) on
// the transport's WaitFD, and on waking drains every published request,
// doing the I/O straight into the granted pages, writes the responses, and
// publishes them with at most one notification per batch, before the
// final check. Each request is copied out of the ring once and only the
// copy is validated; a bad request gets an error response for itself
// alone.
//
// When ctx is done, Serve stops taking requests, flushes the image (unless
// read-only) and returns nil: every request it consumed has been answered
// by then. The requests still in the ring are served by the next Serve on
// the same ring (a resume). When the frontend is hostile Serve returns an
// error wrapping ErrHostile that says why (after the same flush). Serve
// does not close t or img.
func Serve(ctx context.Context, t Transport, proto blkif.Protocol, img image.Image, opts Options) error {
	s, err := newServer(t, proto, img, opts)
	if err != nil {
		return err
	}
	defer s.close()
	s.ctx = ctx

	runtime.LockOSThread()
	defer runtime.UnlockOSThread()

	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return fmt.Errorf("ring: epoll_create1: %w", err)
	}
	defer unix.Close(epfd)
	stopfd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return fmt.Errorf("ring: eventfd: %w", err)
	}
	defer unix.Close(stopfd)
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, t.WaitFD(),
		&unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET, Fd: int32(t.WaitFD())}); err != nil {
		return fmt.Errorf("ring: epoll add wait fd: %w", err)
	}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, stopfd,
		&unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(stopfd)}); err != nil {
		return fmt.Errorf("ring: epoll add stop fd: %w", err)
	}
	// The loop sleeps in a raw syscall, so cancellation must arrive as an
	// fd becoming readable.
	stop := context.AfterFunc(ctx, func() {
		var one = [8]byte{1}
		_, _ = unix.Write(stopfd, one[:])
	})
	defer stop()

	var events [2]unix.EpollEvent
	for {
		if ctx.Err() != nil {
			return s.shutdown()
		}
		if err := t.Ack(); err != nil {
			return fmt.Errorf("ring: ack: %w", err)
		}
		if err := s.drain(); errors.Is(err, errStopped) {
			return s.shutdown()
		} else if err != nil {
			// Everything answered so far was written; make it durable
			// before the ring goes away.
			return errors.Join(err, s.shutdown())
		}
		if ctx.Err() != nil {
			return s.shutdown()
		}
		for {
			_, err := unix.EpollWait(epfd, events[:], -1)
			if err == nil {
				break
			}
			if !errors.Is(err, unix.EINTR) {
				return fmt.Errorf("ring: epoll_wait: %w", err)
			}
		}
		s.stats.Wakeups.Add(1)
	}
}

// server is the state of one Serve call. Only the loop's goroutine
// touches it, except the worker pool (pool.go) which gets jobs by value.
type server struct {
	t        Transport
	back     *Back
	proto    blkif.Protocol
	img      image.Image
	size     int64
	opts     Options
	log      *slog.Logger
	stats    *Stats
	maxInd   int
	pool     *pool
	batcher  image.Batcher   // Options.Batch: the image's, else nil
	ops      []image.BatchOp // runBatch's, reused
	batch    []job
	indBuf   []byte // one copy of an indirect request's segment pages
	indSegs  []blkif.Segment
	notifyFn func() error
	reserver PageReserver // t, if it is one
	copier   Copier       // t, if it copies rather than maps
	bufs     sync.Pool    // of *[]byte, one request's data (copier)
	noWait   bool         // prepare: ErrPagesBusy fails the request
	ctx      context.Context
}

// errStopped: the loop stopped while waiting for page mappings, leaving
// the request it waited for in the ring.
var errStopped = errors.New("ring: stopped")

func newServer(t Transport, proto blkif.Protocol, img image.Image, opts Options) (*server, error) {
	back, err := NewBack(t.Ring(), proto)
	if err != nil {
		return nil, err
	}
	s := &server{t: t, back: back, proto: proto, img: img, size: img.Size(), opts: opts,
		log: opts.Logger, stats: opts.Stats, maxInd: opts.MaxIndirectSegments, ctx: context.Background()}
	if s.log == nil {
		s.log = slog.Default()
	}
	if s.stats == nil {
		s.stats = new(Stats)
	}
	if s.maxInd > maxIndirectSegments {
		s.maxInd = maxIndirectSegments
	}
	if s.maxInd < 0 {
		s.maxInd = 0
	}
	if s.maxInd > 0 {
		s.indSegs = make([]blkif.Segment, s.maxInd)
	}
	if b, ok := img.(image.Batcher); ok && opts.Batch {
		s.batcher = b
	} else if opts.Workers > 1 {
		s.pool = newPool(opts.Workers - 1)
		s.pool.s = s
	}
	s.reserver, _ = t.(PageReserver)
	if c, ok := t.(Copier); ok && c.Copying() {
		s.initCopy(c)
	}
	s.batch = make([]job, back.Entries())
	return s, nil
}

func (s *server) close() {
	if s.pool != nil {
		s.pool.close()
	}
}

// shutdown ends a Serve: nothing is in flight (drain answers everything it
// consumes), so only the flush is left.
func (s *server) shutdown() error {
	if s.opts.ReadOnly {
		return nil
	}
	if err := s.img.Flush(); err != nil {
		return fmt.Errorf("ring: flush at shutdown: %w", err)
	}
	return nil
}

// publish gives back the pages of the requests answered so far (a
// PageReleaser's) and publishes their responses, notifying the frontend
// if it asked.
func (s *server) publish() error {
	if r, ok := s.t.(PageReleaser); ok {
		if err := r.ReleasePages(); err != nil {
			return fmt.Errorf("ring: release pages: %w", err)
		}
	}
	if s.back.PushResponses() {
		s.stats.Notifies.Add(1)
		if err := s.t.Notify(); err != nil {
			return fmt.Errorf("ring: notify: %w", err)
		}
	}
	return nil
}

// drain consumes and answers requests until the final check finds none.
func (s *server) drain() error {
	for {
		n, err := s.back.Pending()
		if err != nil {
			return err
		}
		if n > 0 {
			if err := s.serveBatch(n); err != nil {
				return err
			}
			s.stats.Batches.Add(1)
			if err := s.publish(); err != nil {
				return err
			}
		}
		more, err := s.back.FinalCheck()
		if err != nil {
			return err
		}
		if !more {
			return nil
		}
	}
}
