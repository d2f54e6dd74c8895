package worker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Process is the daemon's handle on one worker process. Safe for
// concurrent use: calls are serialised, one request in flight at a time.
type Process struct {
	pid  int
	conn *net.UnixConn

	mu sync.Mutex // serialises calls on conn

	done    chan struct{} // closed when the process has exited
	waitErr error         // set before done is closed
}

// Error is a failed request, as the worker reported it.
type Error struct {
	Op    string
	Msg   string
	Class string // see ErrorClass
}

func (e *Error) Error() string { return e.Op + ": " + e.Msg }

// Terminal reports whether retrying the same request cannot help: the
// image is corrupt, uses an unsupported feature, is not of the declared
// format, does not exist, or the request was invalid.
func (e *Error) Terminal() bool {
	switch e.Class {
	case "corrupt", "unsupported", "wrong-format", "not-found", "invalid", "permission", "in-use":
		return true
	}
	return false
}

// ErrExited reports that the worker process is gone.
var ErrExited = errors.New("worker exited")

// Start starts a worker: exe re-executed with args (normally
// {"__worker", "--name", NAME}), its control socket on descriptor 3 and its
// standard error on stderr.
func Start(exe string, args []string, stderr io.Writer) (*Process, error) {
	return StartAdoptable(exe, args, stderr, nil)
}

// StartAdoptable is Start with a listening socket handed to the worker as
// descriptor 4 (append "--adopt" to args), on which a daemon started later
// can adopt it (Adopt).
func StartAdoptable(exe string, args []string, stderr io.Writer, adopt *os.File) (*Process, error) {
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("control socket pair: %w", err)
	}
	mine := os.NewFile(uintptr(pair[0]), "worker-control")
	theirs := os.NewFile(uintptr(pair[1]), "worker-control")
	defer theirs.Close()
	c, err := net.FileConn(mine)
	mine.Close()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, args...)
	cmd.ExtraFiles = []*os.File{theirs} // descriptor 3
	if adopt != nil {
		cmd.ExtraFiles = append(cmd.ExtraFiles, adopt) // descriptor 4
	}
	cmd.Stderr = stderr
	cmd.Stdout = stderr
	// Its own process group: a ^C at the daemon's terminal reaches the
	// daemon, which then closes each disk in order, not every worker at
	// once behind its back.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		c.Close()
		return nil, fmt.Errorf("start worker: %w", err)
	}
	p := &Process{pid: cmd.Process.Pid, conn: c.(*net.UnixConn), done: make(chan struct{})}
	go func() {
		// Wait only once the process is gone, so the wait returns at
		// once: a goroutine blocked in Wait holds an OS thread, one per
		// disk, where one parked in the poller holds none. (The child
		// stays a zombie until Wait, so its pid cannot name another.)
		if pidfd, err := unix.PidfdOpen(p.pid, 0); err == nil {
			awaitExit(pidfd)
		}
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// awaitExit returns once the process behind pidfd (which it closes) has
// exited. It waits parked in the runtime's poller, where a pidfd becomes
// readable at the exit, and in poll(2) on its own thread only where the
// poller cannot take the pidfd.
func awaitExit(pidfd int) {
	exited := func(fd uintptr) bool {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, 0)
		return n > 0 || err != nil && err != unix.EINTR
	}
	if err := unix.SetNonblock(pidfd, true); err != nil {
		defer unix.Close(pidfd)
	} else {
		f := os.NewFile(uintptr(pidfd), "pidfd") // non-blocking: in the poller
		defer f.Close()
		if rc, err := f.SyscallConn(); err == nil && rc.Read(exited) == nil {
			return
		}
	}
	fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
	for {
		if _, err := unix.Poll(fds, -1); err != unix.EINTR {
			return
		}
	}
}

// Pid is the worker's process id.
func (p *Process) Pid() int { return p.pid }

// Done is closed once the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// ExitErr is why the process exited; valid after Done is closed.
func (p *Process) ExitErr() error { return p.waitErr }

// Call sends one request with descriptors (which stay open on the caller's
// side) and waits for its reply, at most until ctx is done. A worker error
// comes back as *Error.
func (p *Process) Call(ctx context.Context, req Request, fds ...int) (Reply, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.done:
		return Reply{}, fmt.Errorf("%s: %w (%v)", req.Op, ErrExited, p.waitErr)
	default:
	}
	req.Version = ProtocolVersion
	deadline, _ := ctx.Deadline()
	stop := context.AfterFunc(ctx, func() { p.conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if err := send(p.conn, deadline, req, fds); err != nil {
		return Reply{}, p.callErr(ctx, req.Op, err)
	}
	var rep Reply
	got, err := recv(p.conn, deadline, &rep)
	closeAll(got) // replies carry no descriptors
	if err != nil {
		return Reply{}, p.callErr(ctx, req.Op, err)
	}
	if !rep.OK {
		return rep, &Error{Op: req.Op, Msg: rep.Error, Class: rep.Class}
	}
	return rep, nil
}

func (p *Process) callErr(ctx context.Context, op string, err error) error {
	if ctx.Err() != nil {
		// The stream may now hold a late reply: nothing after this call
		// could pair requests with replies, so the worker must go.
		p.Kill()
		return fmt.Errorf("%s: %w", op, ctx.Err())
	}
	select {
	case <-p.done:
		return fmt.Errorf("%s: %w (%v)", op, ErrExited, p.waitErr)
	case <-time.After(100 * time.Millisecond):
	}
	return fmt.Errorf("%s: %w", op, err)
}

// Close asks the worker to drain, flush and close its image, then waits
// for it to exit. If it does not answer before ctx is done it is killed.
func (p *Process) Close(ctx context.Context) error {
	_, err := p.Call(ctx, Request{Op: OpClose})
	select {
	case <-p.done:
	case <-ctx.Done():
		p.Kill()
		<-p.done
	}
	p.conn.Close()
	if err != nil && !errors.Is(err, ErrExited) {
		return err
	}
	return nil
}

// Release closes the control connection and leaves the worker serving:
// it then waits on its adoption socket for the next daemon, as after its
// daemon's exit.
func (p *Process) Release() error { return p.conn.Close() }

// Kill ends the worker at once (no flush): for a worker that stopped
// answering. Until Adopt learns the pid there is none to signal: kill(2)
// with 0 would end the caller's whole process group.
func (p *Process) Kill() {
	if p.pid <= 0 {
		return
	}
	select {
	case <-p.done:
	default:
		unix.Kill(p.pid, unix.SIGKILL)
	}
}

// Adopt connects to a worker that a previous daemon started, on the
// socket it was handed (StartAdoptable), and asks what it serves. The
// worker is not this process's child: its exit is watched through a pidfd.
func Adopt(ctx context.Context, path string) (*Process, *Describe, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unixpacket", path)
	if err != nil {
		return nil, nil, err
	}
	p := &Process{conn: c.(*net.UnixConn), done: make(chan struct{})}
	rep, err := p.Call(ctx, Request{Op: OpDescribe})
	if err != nil {
		c.Close()
		return nil, nil, err
	}
	if rep.Describe == nil || rep.Describe.Pid <= 0 {
		c.Close()
		return nil, nil, fmt.Errorf("%w: describe without a pid", ErrProtocol)
	}
	p.pid = rep.Describe.Pid
	pidfd, err := unix.PidfdOpen(p.pid, 0)
	if err != nil {
		c.Close()
		return nil, nil, fmt.Errorf("watch worker %d: %w", p.pid, err)
	}
	go func() {
		awaitExit(pidfd)
		p.waitErr = fmt.Errorf("adopted worker %d exited", p.pid)
		close(p.done)
	}()
	return p, rep.Describe, nil
}

// CallFDs is Call for a request whose reply carries descriptors, which
// the caller then owns.
func (p *Process) CallFDs(ctx context.Context, req Request) (Reply, []int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	req.Version = ProtocolVersion
	deadline, _ := ctx.Deadline()
	if err := send(p.conn, deadline, req, nil); err != nil {
		return Reply{}, nil, p.callErr(ctx, req.Op, err)
	}
	var rep Reply
	got, err := recv(p.conn, deadline, &rep)
	if err != nil {
		return Reply{}, nil, p.callErr(ctx, req.Op, err)
	}
	if !rep.OK {
		closeAll(got)
		return rep, nil, &Error{Op: req.Op, Msg: rep.Error, Class: rep.Class}
	}
	return rep, got, nil
}
