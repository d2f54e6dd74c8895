package xenstore

import (
	"context"
	"fmt"
	"net"
	"os"
	"time"
)

// XenbusDevices are the kernel's xenstore devices, newest first.
var XenbusDevices = []string{"/dev/xen/xenbus", "/proc/xen/xenbus"}

// DialXenbus connects through the kernel's xenbus device (a guest, or a
// dom0 whose xenstored runs in a stub domain). The wire format is the
// same as on the socket.
func DialXenbus(ctx context.Context, opts ...Option) (*Client, error) {
	var last error
	for _, p := range XenbusDevices {
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			last = err
			continue
		}
		path := p
		dialer := func(context.Context) (net.Conn, error) {
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				return nil, err
			}
			return fileConn{f}, nil
		}
		return NewClient(fileConn{f}, append([]Option{WithDialer(dialer)}, opts...)...), nil
	}
	return nil, fmt.Errorf("xenstore: no xenbus device: %w", last)
}

// fileConn lets a character device stand in for a net.Conn. Deadlines are
// not supported by the device and are ignored; contexts still bound the
// waits of every call.
type fileConn struct{ *os.File }

type devAddr string

func (a devAddr) Network() string { return "xenbus" }
func (a devAddr) String() string  { return string(a) }

func (c fileConn) LocalAddr() net.Addr                { return devAddr(c.Name()) }
func (c fileConn) RemoteAddr() net.Addr               { return devAddr(c.Name()) }
func (c fileConn) SetDeadline(t time.Time) error      { return nil }
func (c fileConn) SetReadDeadline(t time.Time) error  { return nil }
func (c fileConn) SetWriteDeadline(t time.Time) error { return nil }
