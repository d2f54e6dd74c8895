package worker

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"golang.org/x/sys/unix"
)

// ProtocolVersion is the version of the control protocol. The daemon and a
// worker are the same binary, but a worker left running across an upgrade
// must be recognised, so every message carries it.
const ProtocolVersion = 1

// maxMessage bounds one control message (a SOCK_SEQPACKET datagram).
const maxMessage = 64 << 10

// maxFDs bounds the descriptors one message may carry.
const maxFDs = 8

// Ops of the control protocol.
const (
	OpOpen       = "open"       // open the image
	OpServeNBD   = "serve-nbd"  // serve the NBD export on the passed listening socket
	OpConnect    = "connect"    // connect a ring (local transport: fds memfd, kick, notify)
	OpDisconnect = "disconnect" // stop serving the ring, drain, flush
	OpStats      = "stats"      // counters
	OpFlush      = "flush"      // make every completed write durable
	OpPause      = "pause"      // hold new I/O, finish what is in flight, flush, close the image
	OpResume     = "resume"     // reopen the image (or the one named) and release held I/O
	OpQoS        = "qos"        // set the disk's IOPS and bandwidth limits (0 = none)
	OpDescribe   = "describe"   // what the worker serves (for a daemon adopting it)
	OpExportFD   = "export-fd"  // a duplicate of the export's listening socket (in the reply)
	OpWatchRing  = "watch-ring" // fd: a pipe the worker writes a ring's fault to (watch.go)
	OpClose      = "close"      // drain everything, flush, close the image and exit
)

// Request is one control message from the daemon to a worker. Which
// fields matter depends on Op; descriptors travel beside it (SCM_RIGHTS).
type Request struct {
	Version int    `json:"v"`
	Op      string `json:"op"`

	// open
	Name     string `json:"name,omitempty"`
	Format   string `json:"format,omitempty"`
	Path     string `json:"path,omitempty"`
	ReadOnly bool   `json:"readonly,omitempty"`
	// AllowDirs confines backing files: a backing file outside these
	// directories is refused. Empty: the image's own directory.
	AllowDirs []string `json:"allow_dirs,omitempty"`
	// IO picks the I/O engine (IOEngines; "" is IOAuto). It holds for
	// the worker's life: a resume reopens with the same engine.
	IO string `json:"io,omitempty"`

	// serve-nbd: a TCP export's TLS files (a tls.Config cannot cross
	// processes); no cert means plain text, which the daemon allows only
	// where the YAML says insecure.
	TLSCert string `json:"tls_cert,omitempty"`
	TLSKey  string `json:"tls_key,omitempty"`
	TLSCA   string `json:"tls_ca,omitempty"`

	// connect
	Transport string   `json:"transport,omitempty"` // "local" or "xen"
	Protocol  string   `json:"protocol,omitempty"`  // blkif ABI, as the frontend wrote it ("" = x86_32-abi)
	RingRefs  []uint32 `json:"ring_refs,omitempty"`
	RingOrder int      `json:"ring_order,omitempty"`
	Queue     int      `json:"queue,omitempty"` // blkif multi-queue: which queue's ring
	// xen: the frontend's domain, its event channel port, and whether it
	// negotiated persistent grants.
	Domid        uint32 `json:"domid,omitempty"`
	EventChannel uint32 `json:"event_channel,omitempty"`
	Persistent   bool   `json:"persistent,omitempty"`

	// qos
	IOPS      int64 `json:"iops,omitempty"`
	Bandwidth int64 `json:"bandwidth,omitempty"` // bytes/s
}

// Reply answers one Request.
type Reply struct {
	Version int    `json:"v"`
	OK      bool   `json:"ok"`
	Error   string `json:"error,omitempty"`
	// Class is the error class ("corrupt", "unsupported", "wrong-format",
	// "not-found", "read-only", "invalid") so the daemon can tell terminal
	// errors from transient ones without matching text.
	Class string `json:"class,omitempty"`

	Size       int64  `json:"size,omitempty"`
	SectorSize uint32 `json:"sector_size,omitempty"`
	Stats      *Stats `json:"stats,omitempty"`
	// RingError is set once a ring stopped on its own (a hostile
	// frontend, an I/O error); the daemon reports it on the device.
	RingError string `json:"ring_error,omitempty"`
	Paused    bool   `json:"paused,omitempty"`

	Describe *Describe `json:"describe,omitempty"`
}

// Describe is what a running worker serves.
type Describe struct {
	Pid      int    `json:"pid"`
	Name     string `json:"name"`
	Format   string `json:"format"`
	Path     string `json:"path"`
	ReadOnly bool   `json:"readonly"`
	Size     int64  `json:"size"`
	Paused   bool   `json:"paused"`
	Open     bool   `json:"open"`            // an image is open
	NBD      bool   `json:"nbd"`             // the export is served
	Ring     bool   `json:"ring"`            // a ring is connected
	URing    bool   `json:"uring,omitempty"` // the image does its I/O through io_uring
	// Transport is the connected ring's ("xen" or "local"; "" without a
	// ring). A daemon adopting the worker can leave a Xen ring running:
	// the guest's grants and event channel are the same as before, and
	// remapping them under a live guest is churn, with a window where
	// its notifications find nobody bound.
	Transport string `json:"transport,omitempty"`
}

// Stats are a worker's counters, as `blktap ls` shows them.
type Stats struct {
	RingRequests uint64 `json:"ring_requests"`
	RingErrors   uint64 `json:"ring_errors"`
	NBDReads     uint64 `json:"nbd_reads"`
	NBDWrites    uint64 `json:"nbd_writes"`
	BytesRead    uint64 `json:"bytes_read"`
	BytesWritten uint64 `json:"bytes_written"`
	Flushes      uint64 `json:"flushes"`

	// By path and operation, for metrics.
	RingReads    uint64 `json:"ring_reads"`
	RingWrites   uint64 `json:"ring_writes"`
	RingFlushes  uint64 `json:"ring_flushes"`
	RingDiscards uint64 `json:"ring_discards"`
	NBDFlushes   uint64 `json:"nbd_flushes"`
	NBDTrims     uint64 `json:"nbd_trims"`
	NBDErrors    uint64 `json:"nbd_errors"`
	NBDActive    int64  `json:"nbd_connections"`
	// InFlight is image operations under way now; Latency their times.
	InFlight int64                `json:"in_flight"`
	Latency  map[string]Histogram `json:"latency,omitempty"`
}

// ErrProtocol reports a malformed control message.
var ErrProtocol = errors.New("worker control protocol error")

// send writes one message with optional descriptors. The descriptors stay
// open on the sender's side.
func send(c *net.UnixConn, deadline time.Time, v any, fds []int) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if len(b) > maxMessage {
		return fmt.Errorf("%w: message of %d bytes", ErrProtocol, len(b))
	}
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if err := c.SetWriteDeadline(deadline); err != nil {
		return err
	}
	_, _, err = c.WriteMsgUnix(b, oob, nil)
	return err
}

// recv reads one message and the descriptors that came with it (close-on-exec
// set). The caller owns the descriptors.
func recv(c *net.UnixConn, deadline time.Time, v any) ([]int, error) {
	buf := make([]byte, maxMessage)
	oob := make([]byte, unix.CmsgSpace(maxFDs*4))
	if err := c.SetReadDeadline(deadline); err != nil {
		return nil, err
	}
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	var fds []int
	if oobn > 0 {
		msgs, perr := unix.ParseSocketControlMessage(oob[:oobn])
		if perr != nil {
			return nil, fmt.Errorf("%w: %v", ErrProtocol, perr)
		}
		for i := range msgs {
			if got, perr := unix.ParseUnixRights(&msgs[i]); perr == nil {
				fds = append(fds, got...)
			}
		}
	}
	if err != nil {
		closeAll(fds)
		return nil, err
	}
	if n == 0 && oobn == 0 {
		return nil, io.EOF
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		closeAll(fds)
		return nil, fmt.Errorf("%w: message truncated", ErrProtocol)
	}
	if err := json.Unmarshal(buf[:n], v); err != nil {
		closeAll(fds)
		return nil, fmt.Errorf("%w: %v", ErrProtocol, err)
	}
	return fds, nil
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}
