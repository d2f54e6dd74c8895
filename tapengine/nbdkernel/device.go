package nbdkernel

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Ioctls of linux/nbd.h: _IO(0xab, n), which is 0xab<<8 | n.
const (
	ioctlSetSock    = 0xab00
	ioctlSetBlksize = 0xab01
	ioctlSetSize    = 0xab02
	ioctlDoIt       = 0xab03
	ioctlClearSock  = 0xab04
	ioctlDisconnect = 0xab08
	ioctlSetFlags   = 0xab0a
)

// nbdMajor is the block major of /dev/nbdN (Documentation/admin-guide/devices.txt).
const nbdMajor = 43

// Errors Available and Connect wrap, to be told apart with errors.Is.
var (
	ErrNoDevice   = errors.New("nbdkernel: no such nbd device")
	ErrNotNBD     = errors.New("nbdkernel: not an nbd device")
	ErrBusy       = errors.New("nbdkernel: nbd device already connected")
	ErrPermission = errors.New("nbdkernel: no permission to use the nbd device")
)

// sysfs is where Available looks for the nbd module and devices; tests
// point it elsewhere.
var sysfs = "/sys"

// Available reports why dev (e.g. /dev/nbd0) cannot be connected, or nil
// when it can: it must exist, be an nbd block device, not already be
// connected, and be openable read-write.
func Available(dev string) error {
	st, err := os.Stat(dev)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			if _, err := os.Stat(filepath.Join(sysfs, "module", "nbd")); err != nil {
				return fmt.Errorf("%w: %s: the kernel has no nbd module loaded; run `modprobe nbd` (as root) and try again", ErrNoDevice, dev)
			}
			return fmt.Errorf("%w: %s does not exist; the nbd module has fewer devices (reload it with `modprobe nbd nbds_max=N`)", ErrNoDevice, dev)
		}
		return fmt.Errorf("nbdkernel: %w", err)
	}
	if st.Mode()&fs.ModeDevice == 0 || st.Mode()&fs.ModeCharDevice != 0 {
		return fmt.Errorf("%w: %s is not a block device", ErrNotNBD, dev)
	}
	if sys, ok := st.Sys().(*unix.Stat_t); ok && unix.Major(uint64(sys.Rdev)) != nbdMajor {
		return fmt.Errorf("%w: %s has major %d, nbd devices have %d", ErrNotNBD, dev, unix.Major(uint64(sys.Rdev)), nbdMajor)
	}
	if pid, ok := connectedPID(dev); ok {
		return fmt.Errorf("%w: %s is served by process %s; detach it first", ErrBusy, dev, pid)
	}
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		if errors.Is(err, fs.ErrPermission) {
			return fmt.Errorf("%w: %s: %w (connecting an nbd device needs root)", ErrPermission, dev, err)
		}
		return fmt.Errorf("nbdkernel: %w", err)
	}
	f.Close()
	return nil
}

// connectedPID reads /sys/block/nbdN/pid, which the kernel creates while
// a process runs NBD_DO_IT on the device.
func connectedPID(dev string) (string, bool) {
	b, err := os.ReadFile(filepath.Join(sysfs, "block", filepath.Base(dev), "pid"))
	if err != nil {
		return "", false
	}
	return strings.TrimSpace(string(b)), true
}

// Conn is one kernel nbd device connected to an export. Its methods are
// safe for concurrent use.
type Conn struct {
	dev    string
	export Export
	f      *os.File // the device
	sock   *os.File // the socket handed to the kernel
	nc     net.Conn
	done   chan struct{}
	err    error // NBD_DO_IT's, valid after done
	once   sync.Once
}

// Device returns the device path given to Connect.
func (c *Conn) Device() string { return c.dev }

// Export returns what the handshake learned.
func (c *Conn) Export() Export { return c.export }

// Connect dials the unix socket of an NBD export, negotiates export (""
// for the default), and connects dev to it. It returns once the kernel
// serves the device, or an error; ctx bounds only the connecting.
func Connect(ctx context.Context, dev, socketPath, export string) (*Conn, error) {
	if err := Available(dev); err != nil {
		return nil, err
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", socketPath)
	if err != nil {
		return nil, fmt.Errorf("nbdkernel: dialing the export: %w", err)
	}
	fail := func(err error) (*Conn, error) {
		nc.Close()
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	e, err := handshake(nc, export)
	if !stop() || ctx.Err() != nil {
		return fail(fmt.Errorf("nbdkernel: handshake: %w", context.Cause(ctx)))
	}
	if err != nil {
		return fail(err)
	}
	nc.SetDeadline(time.Time{})
	blk, err := blockSize(e)
	if err != nil {
		return fail(err)
	}
	// The kernel needs a descriptor; File gives a blocking duplicate.
	sock, err := nc.(*net.UnixConn).File()
	if err != nil {
		return fail(fmt.Errorf("nbdkernel: %w", err))
	}
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		sock.Close()
		return fail(fmt.Errorf("nbdkernel: %w", err))
	}
	c := &Conn{dev: dev, export: e, f: f, sock: sock, nc: nc, done: make(chan struct{})}
	setup := make(chan error, 1)
	go c.run(blk, setup)
	if err := <-setup; err != nil {
		return nil, err
	}
	// NBD_DO_IT gives no signal when it is up; the kernel's pid
	// attribute appears when it is. Without sysfs, a short wait in
	// which NBD_DO_IT did not fail has to do.
	_, serr := os.Stat(filepath.Join(sysfs, "block", filepath.Base(dev)))
	noSysfs := time.Now().Add(100 * time.Millisecond)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if _, ok := connectedPID(dev); ok || serr != nil && time.Now().After(noSysfs) {
			return c, nil
		}
		select {
		case <-c.done:
			return nil, fmt.Errorf("nbdkernel: %s: NBD_DO_IT returned at once: %w", dev, c.err)
		case <-ctx.Done():
			c.Disconnect()
			<-c.done
			return nil, fmt.Errorf("nbdkernel: %s: waiting for the device: %w", dev, context.Cause(ctx))
		case <-tick.C:
		}
	}
}

// blockSize picks the device's logical block size: 512, so images with
// 512-byte sector partition tables read right, unless the server needs
// larger blocks.
func blockSize(e Export) (uint32, error) {
	switch {
	case e.MinBlock <= 512:
		return 512, nil
	case e.MinBlock <= 4096:
		return 4096, nil
	}
	return 0, fmt.Errorf("%w: the server's minimum block size %d exceeds the kernel's 4096", ErrProtocol, e.MinBlock)
}

// run configures the device and serves it in NBD_DO_IT until it is
// disconnected or the server goes away. Everything happens on one locked
// thread, as the ioctl interface expects of its one setup task, with
// every signal blocked: a signal would interrupt NBD_DO_IT's wait, and
// the kernel answers that by shutting the socket down. The goroutine
// ends still locked, so the runtime discards the thread and its mask.
func (c *Conn) run(blk uint32, setup chan<- error) {
	runtime.LockOSThread()
	all := unix.Sigset_t{}
	for i := range all.Val {
		all.Val[i] = ^all.Val[i]
	}
	if err := unix.PthreadSigmask(unix.SIG_BLOCK, &all, nil); err != nil {
		c.close()
		setup <- fmt.Errorf("nbdkernel: blocking signals: %w", err)
		close(c.done)
		return
	}
	fd := int(c.f.Fd())
	for _, s := range []struct {
		name string
		req  uint
		arg  int
	}{
		{"NBD_SET_BLKSIZE", ioctlSetBlksize, int(blk)},
		{"NBD_SET_SIZE", ioctlSetSize, int(c.export.Size)},
		{"NBD_SET_FLAGS", ioctlSetFlags, int(c.export.Flags)},
		{"NBD_SET_SOCK", ioctlSetSock, int(c.sock.Fd())},
	} {
		if err := unix.IoctlSetInt(fd, s.req, s.arg); err != nil {
			unix.IoctlSetInt(fd, ioctlClearSock, 0)
			c.close()
			if errors.Is(err, unix.EBUSY) {
				err = fmt.Errorf("%w: %s: %s: %w", ErrBusy, c.dev, s.name, err)
			} else {
				err = fmt.Errorf("nbdkernel: %s: %s: %w", c.dev, s.name, err)
			}
			setup <- err
			close(c.done)
			return
		}
	}
	setup <- nil
	err := unix.IoctlSetInt(fd, ioctlDoIt, 0)
	// Release the socket so the device can be connected again.
	unix.IoctlSetInt(fd, ioctlClearSock, 0)
	if err != nil {
		c.err = fmt.Errorf("nbdkernel: %s: NBD_DO_IT: %w", c.dev, err)
	}
	c.close()
	close(c.done)
}

func (c *Conn) close() {
	c.sock.Close()
	c.nc.Close()
	c.f.Close()
}

// Disconnect asks the kernel to end the connection: it sends
// NBD_CMD_DISC to the server once queued I/O has been answered. Wait
// reports when the device is free.
func (c *Conn) Disconnect() error {
	var err error
	c.once.Do(func() {
		select {
		case <-c.done:
			return
		default:
		}
		// A separate descriptor: c.f is busy in NBD_DO_IT and may be
		// closed under us when it returns.
		f, oerr := os.OpenFile(c.dev, os.O_RDWR, 0)
		if oerr != nil {
			err = fmt.Errorf("nbdkernel: %w", oerr)
			return
		}
		defer f.Close()
		if e := unix.IoctlSetInt(int(f.Fd()), ioctlDisconnect, 0); e != nil {
			err = fmt.Errorf("nbdkernel: %s: NBD_DISCONNECT: %w", c.dev, e)
		}
	})
	return err
}

// Wait blocks until NBD_DO_IT has returned and the device is free. It
// returns nil after Disconnect, and an error when the connection ended
// otherwise (the server went away, I/O errors).
func (c *Conn) Wait() error {
	<-c.done
	return c.err
}
