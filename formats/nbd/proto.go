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
	"github.com/blktap-go/blktap/internal/nbdwire"
)

const (
	// maxOptReply caps an option reply we will read: infos and context
	// names are tiny; a server announcing more is refused, not obeyed.
	maxOptReply = 64 << 10
	// maxChunkMeta caps a non-data chunk (errors, block status): a
	// block-status chunk this big already holds 256Ki extents.
	maxChunkMeta = 2 << 20
)

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

// handshake runs the fixed-newstyle negotiation on a fresh connection
// (the layouts are in internal/nbdwire):
//
//	S: greeting, C: client flags, then per option
//	C: option header + data, S: option replies
//
// Options tried in order: STRUCTURED_REPLY, SET_META_CONTEXT
// base:allocation (only with structured replies), then GO; a server that
// does not know GO gets EXPORT_NAME, which ends the negotiation with the
// size and flags in a fixed reply.
func handshake(br *bufio.Reader, w io.Writer, export string) (exportInfo, error) {
	var info exportInfo
	noZeroes, err := greet(br, w)
	if err != nil {
		return info, err
	}
	// Structured replies: needed for block status, and they let reads
	// return holes without sending zeros.
	if info.structured, err = structuredReplies(br, w); err != nil {
		return info, err
	}
	if info.structured {
		if info.hasMeta, info.metaID, err = setMetaContext(br, w, export); err != nil {
			return info, err
		}
	}
	return goExport(br, w, export, noZeroes, info)
}

// greet reads the server's greeting and answers with the client flags.
// It reports whether both sides dropped the zero padding.
func greet(br *bufio.Reader, w io.Writer) (noZeroes bool, err error) {
	var hello [nbdwire.GreetingSize]byte
	if _, err := io.ReadFull(br, hello[:]); err != nil {
		return false, fmt.Errorf("nbd: reading the server greeting: %w", err)
	}
	hs, err := nbdwire.ParseGreeting(hello[:])
	switch {
	case errors.Is(err, nbdwire.ErrOldstyle):
		return false, fmt.Errorf("nbd: %w: the server speaks the obsolete oldstyle protocol", image.ErrUnsupported)
	case err != nil && binary.BigEndian.Uint64(hello[:]) != nbdwire.MagicNBD:
		return false, fmt.Errorf("nbd: %w: the server is not an NBD server (greeting %q)", image.ErrWrongFormat, hello[0:8])
	case err != nil:
		return false, protoErr("%v", err)
	case hs&nbdwire.FlagFixedNewstyle == 0:
		return false, fmt.Errorf("nbd: %w: the server does not offer fixed newstyle negotiation", image.ErrUnsupported)
	}
	noZeroes = hs&nbdwire.FlagNoZeroes != 0
	clientFlags := uint32(nbdwire.ClientFlagFixedNewstyle)
	if noZeroes {
		clientFlags |= nbdwire.ClientFlagNoZeroes
	}
	return noZeroes, writeAll(w, binary.BigEndian.AppendUint32(nil, clientFlags))
}

// structuredReplies asks for structured replies and reports whether the
// server agreed.
func structuredReplies(br *bufio.Reader, w io.Writer) (bool, error) {
	if err := sendOpt(w, nbdwire.OptStructuredReply, nil); err != nil {
		return false, err
	}
	typ, data, err := readOptReply(br, nbdwire.OptStructuredReply)
	switch {
	case err != nil:
		return false, err
	case typ == nbdwire.RepAck:
		return true, nil
	case typ&nbdwire.RepErrorBit != 0:
		return false, nil
	}
	return false, protoErr("reply type %d to STRUCTURED_REPLY (%d bytes)", typ, len(data))
}

// setMetaContext selects base:allocation and returns its context id, if
// the server has it; without it Map says Data everywhere.
func setMetaContext(br *bufio.Reader, w io.Writer, export string) (ok bool, id uint32, err error) {
	q := nbdwire.AppendMetaContextQuery(nil, export, nbdwire.MetaBaseAllocation)
	if err := sendOpt(w, nbdwire.OptSetMetaContext, q); err != nil {
		return false, 0, err
	}
	for {
		typ, data, err := readOptReply(br, nbdwire.OptSetMetaContext)
		switch {
		case err != nil:
			return false, 0, err
		case typ == nbdwire.RepAck || typ&nbdwire.RepErrorBit != 0:
			return ok, id, nil
		case typ != nbdwire.RepMetaContext:
			return false, 0, protoErr("reply type %d to SET_META_CONTEXT", typ)
		case len(data) < 5:
			return false, 0, protoErr("META_CONTEXT reply of %d bytes", len(data))
		case string(data[4:]) == nbdwire.MetaBaseAllocation:
			ok, id = true, binary.BigEndian.Uint32(data[0:4])
		}
	}
}

// goExport sends GO with no info requests: the server sends EXPORT (size,
// flags) at least. We do not ask for BLOCK_SIZE, which would promise to
// honour the server's minimum alignment; the server then accepts any
// alignment, and a BLOCK_SIZE it volunteers still caps our payloads.
func goExport(br *bufio.Reader, w io.Writer, export string, noZeroes bool, info exportInfo) (exportInfo, error) {
	if err := sendOpt(w, nbdwire.OptGo, nbdwire.AppendInfoQuery(nil, export)); err != nil {
		return info, err
	}
	gotExport := false
	info.maxPayload = nbdwire.DefaultMaxPayload
	for {
		typ, data, err := readOptReply(br, nbdwire.OptGo)
		switch {
		case err != nil:
			return info, err
		case typ == nbdwire.RepInfo:
			var isExport bool
			if isExport, err = goInfo(&info, data); err != nil {
				return info, err
			}
			gotExport = gotExport || isExport
		case typ == nbdwire.RepAck && !gotExport:
			return info, protoErr("GO acknowledged without INFO_EXPORT")
		case typ == nbdwire.RepAck:
			return info, nil
		case typ == nbdwire.RepErrUnsupported:
			return exportName(br, w, export, noZeroes, info)
		case typ == nbdwire.RepErrUnknown:
			return info, fmt.Errorf("nbd: export %q: %w: %s", export, fs.ErrNotExist, data)
		case typ&nbdwire.RepErrorBit != 0:
			return info, fmt.Errorf("nbd: export %q refused by the server (error %#x): %s", export, typ, data)
		default:
			return info, protoErr("reply type %d to GO", typ)
		}
	}
}

// goInfo takes one NBD_REP_INFO to GO into info and reports whether it
// was INFO_EXPORT.
func goInfo(info *exportInfo, data []byte) (isExport bool, err error) {
	typ, rest, err := nbdwire.ParseInfo(data)
	if err != nil {
		return false, protoErr("%v", err)
	}
	switch typ {
	case nbdwire.InfoExport:
		size, flags, _ := nbdwire.ParseExport(rest)
		info.size, info.flags, err = checkExport(size, flags)
		return true, err
	case nbdwire.InfoBlockSize:
		bs, _ := nbdwire.ParseBlockSize(rest)
		// Below 512 would make big requests absurdly many; such a
		// server is broken, and 512 is what every block device gives
		// anyway.
		if bs.MaxPayload >= 512 && bs.MaxPayload < info.maxPayload {
			info.maxPayload = bs.MaxPayload
		}
	}
	return false, nil
}

// exportName is the fallback for servers without GO. A server that does
// not know the export closes the connection instead of answering.
func exportName(br *bufio.Reader, w io.Writer, export string, noZeroes bool, info exportInfo) (exportInfo, error) {
	if err := sendOpt(w, nbdwire.OptExportName, []byte(export)); err != nil {
		return info, err
	}
	n := nbdwire.ExportNameReplySize
	if !noZeroes {
		n += nbdwire.ExportNameZeroes
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(br, b); err != nil {
		return info, fmt.Errorf("nbd: EXPORT_NAME %q: the server closed the connection (no such export?): %w", export, err)
	}
	size, flags, _ := nbdwire.ParseExport(b)
	var err error
	info.size, info.flags, err = checkExport(size, flags)
	// Structured replies and meta contexts acknowledged before stay in
	// force: they belong to the session, not to how the export was chosen.
	return info, err
}

func checkExport(size uint64, flags uint16) (int64, uint16, error) {
	if size > 1<<62 {
		return 0, 0, protoErr("export size %d", size)
	}
	if flags&nbdwire.TransHasFlags == 0 {
		flags = nbdwire.TransHasFlags // the other bits are meaningless then
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
	return writeAll(w, nbdwire.AppendOption(make([]byte, 0, nbdwire.OptionHeaderSize+len(data)), opt, data))
}

// readOptReply reads one option reply to opt.
func readOptReply(br *bufio.Reader, opt uint32) (typ uint32, data []byte, err error) {
	var h [nbdwire.OptionReplyHeaderSize]byte
	if _, err := io.ReadFull(br, h[:]); err != nil {
		return 0, nil, fmt.Errorf("nbd: reading the reply to option %d: %w", opt, err)
	}
	rh, err := nbdwire.ParseOptionReplyHeader(h[:])
	switch {
	case err != nil:
		return 0, nil, protoErr("%v", err)
	case rh.Option != opt:
		return 0, nil, protoErr("reply for option %d while negotiating option %d", rh.Option, opt)
	case rh.Length > maxOptReply:
		return 0, nil, protoErr("option reply of %d bytes (at most %d)", rh.Length, maxOptReply)
	}
	data = make([]byte, rh.Length)
	if _, err := io.ReadFull(br, data); err != nil {
		return 0, nil, fmt.Errorf("nbd: reading the reply to option %d: %w", opt, err)
	}
	return rh.Type, data, nil
}
