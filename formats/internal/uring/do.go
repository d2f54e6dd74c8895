package uring

import (
	"errors"
	"fmt"
	"io"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

// Do runs every op on fd, as many at once as the ring holds, and returns
// once all have completed. Each op's N and Err say how it went; the
// returned error is the ring's own failure (io_uring_enter refused): then
// every op short of len(Buf) carries it, and the ring is broken (a Pool
// closes it on Put). Ops may overlap in any order: the
// caller puts nothing in one call that must happen after another op of it.
func (r *Ring) Do(fd int, ops []Op) error {
	if len(ops) == 0 {
		return nil
	}
	// Completions of reads the kernel punts to its workers are posted as
	// task work of the submitting thread (COOP_TASKRUN: without an
	// interrupt). Waiting on the same thread runs that work in the wait.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	defer r.pinner.Unpin()
	r.pending = r.pending[:0]
	for i := range ops {
		ops[i].N, ops[i].Err = 0, nil
		if len(ops[i].Buf) > 0 {
			// The kernel holds the address until completion.
			r.pinner.Pin(&ops[i].Buf[0])
		}
		r.pending = append(r.pending, i)
	}
	inflight := uint32(0)
	tail := r.q.submitted() // everything before is consumed: nothing in flight
	for len(r.pending) > 0 || inflight > 0 {
		queued := uint32(0)
		for len(r.pending) > 0 && inflight+queued < r.q.sqEntries {
			i := r.pending[len(r.pending)-1]
			r.pending = r.pending[:len(r.pending)-1]
			op := &ops[i]
			code := uint8(opRead)
			if op.Write {
				code = opWrite
			}
			r.q.push(tail, code, int32(fd), op.Buf[op.N:], op.Off+int64(op.N), uint64(i))
			tail++
			queued++
		}
		r.q.publish(tail)
		if err := r.enter(tail, inflight+queued); err != nil {
			// Ops may still be in the kernel's hands: this ring must
			// never be used again (the Pool closes it).
			r.broken = true
			failShort(ops, err)
			return err
		}
		inflight += queued
		inflight -= uint32(r.q.reap(func(tag uint64, res int32) { r.complete(ops, int(tag), res) }))
	}
	return nil
}

// enter submits what is queued up to tail and waits for want completions
// in all. It retries an interrupted wait; a submission the kernel could
// not take yet (EAGAIN, EBUSY) is retried once completions free room.
func (r *Ring) enter(tail, want uint32) error {
	for {
		toSubmit := tail - r.q.submitted()
		_, err := enter(r.fd, toSubmit, want, enterGetEvents)
		switch {
		case err == nil:
			if r.q.submitted() == tail {
				return nil
			}
			// Fewer taken than asked: the kernel stopped at an SQE it
			// could not start (it posts a completion for that one), so
			// the rest go in on the next round.
		case errors.Is(err, unix.EINTR), errors.Is(err, unix.EAGAIN), errors.Is(err, unix.EBUSY):
			if r.q.submitted() == tail {
				// The wait was cut short; ask again with nothing new.
				continue
			}
		default:
			return fmt.Errorf("io_uring_enter: %w", err)
		}
	}
}

// complete records one completion and queues the rest of a short or
// retryable transfer.
func (r *Ring) complete(ops []Op, i int, res int32) {
	if i < 0 || i >= len(ops) {
		return // not ours: cannot happen, the ring is private
	}
	op := &ops[i]
	switch {
	case res > 0:
		op.N += int(res)
		if op.N < len(op.Buf) {
			r.pending = append(r.pending, i)
		}
	case res == 0 && len(op.Buf) > op.N:
		if op.Write {
			op.Err = io.ErrShortWrite
		}
		// A read at end of file: N < len(Buf), nil error, as pread says.
	case res == -int32(unix.EAGAIN), res == -int32(unix.EINTR):
		r.pending = append(r.pending, i)
	case res < 0:
		op.Err = syscall.Errno(-res)
	}
}

func failShort(ops []Op, err error) {
	for i := range ops {
		if ops[i].Err == nil && ops[i].N < len(ops[i].Buf) {
			ops[i].Err = err
		}
	}
}
