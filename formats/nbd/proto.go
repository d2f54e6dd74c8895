package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/formats/image"
)

// Protocol numbers (NBD proto.md; all integers on the wire are big-endian).
const (
	magicNBD      = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt      = 0x49484156454f5054 // "IHAVEOPT"
	magicOldstyle = 0x00420281861253
	magicOptReply = 0x3e889045565a9
	magicRequest  = 0x25609513
	magicSimple   = 0x67446698
	magicChunk    = 0x668e33ef
	magicExtReply = 0x6e8a278c

	hsFixedNewstyle = 1 << 0
	hsNoZeroes      = 1 << 1

	optExportName     = 1
	optAbort          = 2
	optGo             = 7
	optStructuredRepl = 8
	optSetMetaContext = 10

	repAck         = 1
	repInfo        = 3
	repMetaContext = 4
	repErrBit      = 1 << 31
	repErrUnsup    = repErrBit | 1
	repErrPolicy   = repErrBit | 2
	repErrUnknown  = repErrBit | 6

	infoExport    = 0
	infoBlockSize = 3

	tfHasFlags     = 1 << 0
	tfReadOnly     = 1 << 1
	tfSendFlush    = 1 << 2
	tfSendTrim     = 1 << 5
	tfWriteZeroes  = 1 << 6
	tfCanMultiConn = 1 << 8

	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6
	cmdBlockStatus = 7

	chunkDone        = 1 << 0
	chunkNone        = 0
	chunkOffsetData  = 1
	chunkOffsetHole  = 2
	chunkBlockStatus = 5
	chunkErrBit      = 1 << 15

	stateHole = 1 << 0
	stateZero = 1 << 1

	metaAllocation = "base:allocation"

	// maxOptReply caps an option reply we will read: infos and context
	// names are tiny; a server announcing more is refused, not obeyed.
	maxOptReply = 64 << 10
	// maxChunkMeta caps a non-data chunk (errors, block status): a
	// block-status chunk this big already holds 256Ki extents.
	maxChunkMeta = 2 << 20
	// defaultMaxPayload is the protocol's default maximum payload.
	defaultMaxPayload = 32 << 20
)

var cmdNames = [...]string{"READ", "WRITE", "DISC", "FLUSH", "TRIM", "CACHE", "WRITE_ZEROES", "BLOCK_STATUS"}

func cmdName(c uint16) string {
	if int(c) < len(cmdNames) {
		return cmdNames[c]
	}
	return fmt.Sprintf("CMD_%d", c)
}

var (
	// ErrProtocol: the server sent something the protocol does not
	// allow. The connection is dropped (and reconnected).
	ErrProtocol = errors.New("NBD protocol violation by the server")
	// ErrTimeout: a request got no answer within Options.Timeout.
	// Errors of this class also match unix.EIO.
	ErrTimeout = errors.New("NBD request timed out")
	// ErrDisconnected: the connection is gone and will not come back.
	ErrDisconnected = errors.New("NBD server disconnected")
)

// ServerError is an error the server answered a request with. It unwraps
// to the errno, so errors.Is(err, unix.ENOSPC) works.
type ServerError struct {
	Cmd     string     // "READ", "WRITE", ...
	Code    uint32     // the NBD error code as sent
	Errno   unix.Errno // its errno (EIO for codes the protocol does not define)
	Message string     // the server's message, if it sent one
}

func (e *ServerError) Error() string {
	s := fmt.Sprintf("nbd: server failed %s: %v (code %d)", e.Cmd, e.Errno, e.Code)
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

func (e *ServerError) Unwrap() error { return e.Errno }

// errnoOf maps NBD error codes (proto.md, "Error values") to errnos.
func errnoOf(code uint32) unix.Errno {
	switch code {
	case 1:
		return unix.EPERM
	case 5:
		return unix.EIO
	case 12:
		return unix.ENOMEM
	case 22:
		return unix.EINVAL
	case 28:
		return unix.ENOSPC
	case 75:
		return unix.EOVERFLOW
	case 95:
		return unix.ENOTSUP
	case 108:
		return unix.ESHUTDOWN
	}
	return unix.EIO
}

func protoErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, args...))
}

// exportInfo is what the handshake learned about the export.
type exportInfo struct {
	size       int64
	flags      uint16 // transmission flags
	structured bool   // structured replies negotiated
	hasMeta    bool   // base:allocation negotiated
	metaID     uint32
	maxPayload uint32
}

// handshake runs the fixed-newstyle negotiation on a fresh connection:
//
//	S: NBDMAGIC | IHAVEOPT | u16 handshake flags
//	C: u32 client flags
//	C: IHAVEOPT | u32 option | u32 length | data        (per option)
//	S: 0x3e889045565a9 | u32 option | u32 type | u32 length | data   (replies)
//
// Options tried in order: STRUCTURED_REPLY, SET_META_CONTEXT
// base:allocation (only with structured replies), then GO; a server that
// does not know GO gets EXPORT_NAME, which ends the negotiation with the
// size and flags in a fixed reply.
func handshake(br *bufio.Reader, w io.Writer, export string) (exportInfo, error) {
	var info exportInfo
	var hello [18]byte
	if _, err := io.ReadFull(br, hello[:]); err != nil {
		return info, fmt.Errorf("nbd: reading the server greeting: %w", err)
	}
	if binary.BigEndian.Uint64(hello[0:8]) != magicNBD {
		return info, fmt.Errorf("nbd: %w: the server is not an NBD server (greeting %q)", image.ErrWrongFormat, hello[0:8])
	}
	switch m := binary.BigEndian.Uint64(hello[8:16]); m {
	case magicOpt:
	case magicOldstyle:
		return info, fmt.Errorf("nbd: %w: the server speaks the obsolete oldstyle protocol", image.ErrUnsupported)
	default:
		return info, protoErr("greeting magic %#x", m)
	}
	hs := binary.BigEndian.Uint16(hello[16:18])
	if hs&hsFixedNewstyle == 0 {
		return info, fmt.Errorf("nbd: %w: the server does not offer fixed newstyle negotiation", image.ErrUnsupported)
	}
	noZeroes := hs&hsNoZeroes != 0
	cflags := uint32(hsFixedNewstyle)
	if noZeroes {
		cflags |= hsNoZeroes
	}
	if err := writeAll(w, binary.BigEndian.AppendUint32(nil, cflags)); err != nil {
		return info, err
	}

	// Structured replies: needed for block status, and they let reads
	// return holes without sending zeros.
	if err := sendOpt(w, optStructuredRepl, nil); err != nil {
		return info, err
	}
	for {
		typ, data, err := readOptReply(br, optStructuredRepl)
		if err != nil {
			return info, err
		}
		if typ == repAck {
			info.structured = true
			break
		}
		if typ&repErrBit != 0 {
			break
		}
		return info, protoErr("reply type %d to STRUCTURED_REPLY (%d bytes)", typ, len(data))
	}

	if info.structured {
		q := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
		q = append(q, export...)
		q = binary.BigEndian.AppendUint32(q, 1)
		q = binary.BigEndian.AppendUint32(q, uint32(len(metaAllocation)))
		q = append(q, metaAllocation...)
		if err := sendOpt(w, optSetMetaContext, q); err != nil {
			return info, err
		}
	meta:
		for {
			typ, data, err := readOptReply(br, optSetMetaContext)
			if err != nil {
				return info, err
			}
			switch {
			case typ == repAck:
				break meta
			case typ == repMetaContext:
				if len(data) < 5 {
					return info, protoErr("META_CONTEXT reply of %d bytes", len(data))
				}
				if string(data[4:]) == metaAllocation {
					info.hasMeta, info.metaID = true, binary.BigEndian.Uint32(data[0:4])
				}
			case typ&repErrBit != 0:
				// No block status from this server: Map says Data.
				break meta
			default:
				return info, protoErr("reply type %d to SET_META_CONTEXT", typ)
			}
		}
	}

	// GO with no info requests: the server sends EXPORT (size, flags) at
	// least. We do not ask for BLOCK_SIZE, which would promise to honour
	// the server's minimum alignment; the server then accepts any
	// alignment, and a BLOCK_SIZE it volunteers still caps our payloads.
	g := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	g = append(g, export...)
	g = binary.BigEndian.AppendUint16(g, 0)
	if err := sendOpt(w, optGo, g); err != nil {
		return info, err
	}
	gotExport := false
	info.maxPayload = defaultMaxPayload
	for {
		typ, data, err := readOptReply(br, optGo)
		if err != nil {
			return info, err
		}
		switch {
		case typ == repInfo:
			if len(data) < 2 {
				return info, protoErr("INFO reply of %d bytes", len(data))
			}
			switch binary.BigEndian.Uint16(data[0:2]) {
			case infoExport:
				if len(data) != 12 {
					return info, protoErr("INFO_EXPORT of %d bytes, want 12", len(data))
				}
				info.size, info.flags, err = checkExport(binary.BigEndian.Uint64(data[2:10]), binary.BigEndian.Uint16(data[10:12]))
				if err != nil {
					return info, err
				}
				gotExport = true
			case infoBlockSize:
				if len(data) != 14 {
					return info, protoErr("INFO_BLOCK_SIZE of %d bytes, want 14", len(data))
				}
				// Below 512 would make big requests absurdly many;
				// such a server is broken, and 512 is what every block
				// device gives anyway.
				if mx := binary.BigEndian.Uint32(data[10:14]); mx >= 512 && mx < info.maxPayload {
					info.maxPayload = mx
				}
			}
		case typ == repAck:
			if !gotExport {
				return info, protoErr("GO acknowledged without INFO_EXPORT")
			}
			return info, nil
		case typ == repErrUnsup:
			return exportName(br, w, export, noZeroes, info)
		case typ == repErrUnknown:
			return info, fmt.Errorf("nbd: export %q: %w: %s", export, fs.ErrNotExist, data)
		case typ&repErrBit != 0:
			return info, fmt.Errorf("nbd: export %q refused by the server (error %#x): %s", export, typ, data)
		default:
			return info, protoErr("reply type %d to GO", typ)
		}
	}
}

// exportName is the fallback for servers without GO. A server that does
// not know the export closes the connection instead of answering.
func exportName(br *bufio.Reader, w io.Writer, export string, noZeroes bool, info exportInfo) (exportInfo, error) {
	if err := sendOpt(w, optExportName, []byte(export)); err != nil {
		return info, err
	}
	n := 10
	if !noZeroes {
		n += 124
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(br, b); err != nil {
		return info, fmt.Errorf("nbd: EXPORT_NAME %q: the server closed the connection (no such export?): %w", export, err)
	}
	var err error
	info.size, info.flags, err = checkExport(binary.BigEndian.Uint64(b[0:8]), binary.BigEndian.Uint16(b[8:10]))
	// Structured replies and meta contexts acknowledged before stay in
	// force: they belong to the session, not to how the export was chosen.
	return info, err
}

func checkExport(size uint64, flags uint16) (int64, uint16, error) {
	if size > 1<<62 {
		return 0, 0, protoErr("export size %d", size)
	}
	if flags&tfHasFlags == 0 {
		flags = tfHasFlags // the other bits are meaningless then
	}
	return int64(size), flags, nil
}

func writeAll(w io.Writer, b []byte) error {
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("nbd: send: %w", err)
	}
	return nil
}

func sendOpt(w io.Writer, opt uint32, data []byte) error {
	b := make([]byte, 16, 16+len(data))
	binary.BigEndian.PutUint64(b[0:8], magicOpt)
	binary.BigEndian.PutUint32(b[8:12], opt)
	binary.BigEndian.PutUint32(b[12:16], uint32(len(data)))
	return writeAll(w, append(b, data...))
}

// readOptReply reads one option reply to opt.
func readOptReply(br *bufio.Reader, opt uint32) (typ uint32, data []byte, err error) {
	var h [20]byte
	if _, err := io.ReadFull(br, h[:]); err != nil {
		return 0, nil, fmt.Errorf("nbd: reading the reply to option %d: %w", opt, err)
	}
	if m := binary.BigEndian.Uint64(h[0:8]); m != magicOptReply {
		return 0, nil, protoErr("option reply magic %#x", m)
	}
	if o := binary.BigEndian.Uint32(h[8:12]); o != opt {
		return 0, nil, protoErr("reply for option %d while negotiating option %d", o, opt)
	}
	typ = binary.BigEndian.Uint32(h[12:16])
	n := binary.BigEndian.Uint32(h[16:20])
	if n > maxOptReply {
		return 0, nil, protoErr("option reply of %d bytes (at most %d)", n, maxOptReply)
	}
	data = make([]byte, n)
	if _, err := io.ReadFull(br, data); err != nil {
		return 0, nil, fmt.Errorf("nbd: reading the reply to option %d: %w", opt, err)
	}
	return typ, data, nil
}

// putRequest encodes a request header:
//
//	0       4       6       8               16              24      28
//	+-------+-------+-------+---------------+---------------+-------+
//	| magic | flags | type  | cookie        | offset        | length|
//	+-------+-------+-------+---------------+---------------+-------+
func putRequest(b *[28]byte, flags, cmd uint16, cookie uint64, off uint64, length uint32) {
	binary.BigEndian.PutUint32(b[0:4], magicRequest)
	binary.BigEndian.PutUint16(b[4:6], flags)
	binary.BigEndian.PutUint16(b[6:8], cmd)
	binary.BigEndian.PutUint64(b[8:16], cookie)
	binary.BigEndian.PutUint64(b[16:24], off)
	binary.BigEndian.PutUint32(b[24:28], length)
}
