package reconciler

import (
	"context"
	"fmt"
	"net"
	"os"
	"sync"
	"time"
)

// How the daemon ends (README "Stopping and upgrading"):
//
//  1. SIGTERM or SIGINT (systemctl stop / restart, ^C): the daemon lets the
//     reconciles in flight finish and exits. Every worker keeps serving its
//     disk; the next `blktap run` on the same state directory adopts them,
//     as after a crash. Guests never notice.
//  2. `blktap shutdown` (POST /v1/shutdown on the API socket): the daemon
//     flushes and closes every disk, stops every worker, answers, and exits.
//     For host shutdown, after the guests have stopped.

// shutdownState is a `blktap shutdown` in progress. Safe for concurrent use.
type shutdownState struct {
	once      sync.Once
	requested chan struct{} // closed by request
	done      chan struct{} // closed once every disk is closed
	closed    int           // disks closed; read after done
}

func newShutdownState() *shutdownState {
	return &shutdownState{requested: make(chan struct{}), done: make(chan struct{})}
}

func (s *shutdownState) request() { s.once.Do(func() { close(s.requested) }) }

// ShutdownReply is the answer to POST /v1/shutdown, sent once every disk
// is closed.
type ShutdownReply struct {
	Pid    int `json:"pid"`    // the daemon's, which exits next
	Closed int `json:"closed"` // disks flushed and closed
}

// readySettle is how long the queue must stay idle before the daemon
// calls itself ready: a device whose handshake waits for a watch event
// (the local frontend's own writes come back that way) is not yet done
// the moment its reconcile returns.
const readySettle = 300 * time.Millisecond

// readyLimit bounds the wait: a disk that never converges must not keep
// systemd from starting the daemon (its status says what is wrong).
const readyLimit = 60 * time.Second

// waitConverged returns once the queue has been idle for readySettle
// (every device declared at start has converged, failed with its error
// recorded, or waits for someone else), or after limit (false).
func waitConverged(ctx context.Context, q *queue, settle, limit time.Duration) bool {
	deadline := time.NewTimer(limit)
	defer deadline.Stop()
	for {
		select {
		case <-q.Idle():
		case <-deadline.C:
			return false
		case <-ctx.Done():
			return false
		}
		_, before := q.quiet()
		select {
		case <-time.After(settle):
		case <-deadline.C:
			return false
		case <-ctx.Done():
			return false
		}
		if idle, after := q.quiet(); idle && after == before {
			return true
		}
	}
}

// notifier sends sd_notify(3) messages to the service manager: one
// datagram to the unix socket $NOTIFY_SOCKET names (a path, or an abstract
// name written with a leading '@'). It does nothing when the variable is
// unset (not started by systemd, or Type= is not notify).
type notifier struct{ addr string }

// takeNotifySocket reads $NOTIFY_SOCKET and removes it from the
// environment, so the workers (which outlive the daemon) never send
// messages for it.
func takeNotifySocket() notifier {
	addr := os.Getenv("NOTIFY_SOCKET")
	os.Unsetenv("NOTIFY_SOCKET")
	return notifier{addr: addr}
}

func (n notifier) notify(state string) error {
	if n.addr == "" {
		return nil
	}
	if n.addr[0] != '/' && n.addr[0] != '@' {
		return fmt.Errorf("NOTIFY_SOCKET %q: only unix sockets are supported", n.addr)
	}
	// A leading '@' names an abstract socket; the syscall package turns
	// it into the leading NUL byte the kernel expects.
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: n.addr, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(state)); err != nil {
		return fmt.Errorf("sd_notify: %w", err)
	}
	return nil
}
