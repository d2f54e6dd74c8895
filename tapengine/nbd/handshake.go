package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/blktap-go/blktap/internal/nbdwire"
)

// Meta context ids handed out by SET_META_CONTEXT. LIST answers with id 0
// as the protocol asks.
const (
	ctxBaseAllocation = 1
	ctxAllocDepth     = 2
)

const (
	nameBaseAllocation = "base:allocation"
	nameAllocDepth     = "qemu:allocation-depth"
)

// maxOptions bounds how many options one client may send before it is
// taken for a denial of service and dropped.
const maxOptions = 1024

// errAborted ends a handshake the client closed with NBD_OPT_ABORT or by
// hanging up cleanly before choosing an export.
var errAborted = errors.New("nbd: client ended the handshake")

// session is what a handshake negotiated for one connection.
type session struct {
	noZeroes   bool
	structured bool // structured replies (implied by extended)
	extended   bool // extended headers
	// Selected meta contexts (SET_META_CONTEXT); both false = none.
	metaAlloc bool
	metaDepth bool
	metaFor   string // the export name the contexts were selected for
	tflags    uint16 // transmission flags sent to the client
}

// negotiator runs the server side of fixed newstyle option haggling. It
// only reads r and writes w, so the fuzzer can drive it with bytes.
type negotiator struct {
	s    *Server
	r    io.Reader
	w    *bufio.Writer
	sess session
	buf  []byte // option data, at most maxOptionLen

	// tlsRequired makes this a FORCEDTLS server (proto.md "TLS
	// support"): until STARTTLS succeeds, every option but ABORT and
	// STARTTLS is refused with ERR_TLS_REQD, and EXPORT_NAME, which
	// cannot be refused, drops the client.
	tlsRequired bool
	tlsDone     bool
	// startTLS runs the TLS handshake once STARTTLS's ACK has left, and
	// points r and w at the TLS session. The fuzzer passes one that
	// keeps the plain stream.
	startTLS func() error
}

// negotiate runs the handshake to the transmission phase. It returns the
// negotiated session, errAborted when the client left politely, or an
// error wrapping ErrProtocol (or an I/O error) when it must be dropped.
func (n *negotiator) negotiate() (*session, error) {
	var hb [nbdwire.GreetingSize]byte
	nbdwire.PutGreeting(hb[:], nbdwire.FlagFixedNewstyle|nbdwire.FlagNoZeroes)
	n.w.Write(hb[:])
	if err := n.w.Flush(); err != nil {
		return nil, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(n.r, cf[:]); err != nil {
		return nil, fmt.Errorf("nbd: reading client flags: %w", err)
	}
	flags := binary.BigEndian.Uint32(cf[:])
	if flags&^(nbdwire.ClientFlagFixedNewstyle|nbdwire.ClientFlagNoZeroes) != 0 {
		// The protocol makes unknown client flags fatal.
		return nil, fmt.Errorf("%w: unknown client flags %#x", ErrProtocol, flags)
	}
	n.sess.noZeroes = flags&nbdwire.ClientFlagNoZeroes != 0
	if n.tlsRequired && flags&nbdwire.ClientFlagFixedNewstyle == 0 {
		// TLS needs fixed newstyle, and without TLS this server
		// serves nothing: the client can never get anywhere.
		return nil, fmt.Errorf("%w: TLS is required but the client did not set FIXED_NEWSTYLE", ErrProtocol)
	}

	for i := 0; i < maxOptions; i++ {
		var oh [nbdwire.OptionHeaderSize]byte
		if _, err := io.ReadFull(n.r, oh[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil, errAborted
			}
			return nil, fmt.Errorf("nbd: reading option header: %w", err)
		}
		opt, length, err := nbdwire.ParseOptionHeader(oh[:])
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrProtocol, err)
		}
		if length > maxOptionLen {
			// Skip the data so the stream stays in frame, then refuse.
			if _, err := io.CopyN(io.Discard, n.r, int64(length)); err != nil {
				return nil, fmt.Errorf("nbd: skipping option %d: %w", opt, err)
			}
			if opt == nbdwire.OptExportName {
				return nil, fmt.Errorf("%w: export name of %d bytes", ErrProtocol, length)
			}
			if n.tlsRequired && !n.tlsDone && opt != nbdwire.OptAbort {
				n.replyErr(opt, nbdwire.RepErrTLSRequired, msgTLSReqd)
			} else {
				n.replyErr(opt, nbdwire.RepErrTooBig, "option data too long")
			}
			if err := n.w.Flush(); err != nil {
				return nil, err
			}
			continue
		}
		if cap(n.buf) < int(length) {
			n.buf = make([]byte, length)
		}
		data := n.buf[:length]
		if _, err := io.ReadFull(n.r, data); err != nil {
			return nil, fmt.Errorf("nbd: reading option %d data: %w", opt, err)
		}
		done, err := n.option(opt, data)
		if err != nil {
			return nil, err
		}
		if err := n.w.Flush(); err != nil {
			return nil, err
		}
		if done {
			return &n.sess, nil
		}
	}
	return nil, fmt.Errorf("%w: more than %d options", ErrProtocol, maxOptions)
}

// msgTLSReqd is the text sent with NBD_REP_ERR_TLS_REQD.
const msgTLSReqd = "this export requires TLS: send NBD_OPT_STARTTLS first"

// beforeTLS answers an option that arrives on a TLS-only server before
// STARTTLS succeeded. handled false passes it on (ABORT).
func (n *negotiator) beforeTLS(opt uint32, data []byte) (handled bool, err error) {
	switch opt {
	case nbdwire.OptAbort:
		return false, nil
	case nbdwire.OptExportName:
		// The one option that cannot be answered with an error.
		return true, fmt.Errorf("%w: EXPORT_NAME before STARTTLS on a TLS-only server", ErrProtocol)
	case nbdwire.OptStartTLS:
		if len(data) != 0 {
			return true, n.replyErr(opt, nbdwire.RepErrInvalid, "STARTTLS takes no data")
		}
		if err := n.reply(opt, nbdwire.RepAck, nil); err != nil {
			return true, err
		}
		// The ACK must reach the client in clear before either side
		// speaks TLS.
		if err := n.w.Flush(); err != nil {
			return true, err
		}
		if err := n.startTLS(); err != nil {
			return true, err
		}
		n.tlsDone = true
		return true, nil
	}
	return true, n.replyErr(opt, nbdwire.RepErrTLSRequired, msgTLSReqd)
}

// option answers one option. done reports the move to transmission.
func (n *negotiator) option(opt uint32, data []byte) (done bool, err error) {
	if n.tlsRequired && !n.tlsDone {
		if handled, err := n.beforeTLS(opt, data); handled || err != nil {
			return false, err
		}
	}
	switch opt {
	case nbdwire.OptExportName:
		return n.exportName(data)

	case nbdwire.OptAbort:
		// The client hangs up after our ACK; some never read it, so a
		// failed write is no error.
		n.reply(opt, nbdwire.RepAck, nil)
		n.w.Flush()
		return false, errAborted

	case nbdwire.OptList:
		return false, n.list(data)

	case nbdwire.OptInfo, nbdwire.OptGo:
		return n.infoGo(opt, data)

	case nbdwire.OptStructuredReply, nbdwire.OptExtendedHeaders:
		return false, n.headerStyle(opt, data)

	case nbdwire.OptListMetaContext, nbdwire.OptSetMetaContext:
		return false, n.metaContext(opt, data)

	case nbdwire.OptStartTLS:
		if n.tlsDone {
			return false, n.replyErr(opt, nbdwire.RepErrInvalid, "TLS is already running")
		}
		return false, n.replyErr(opt, nbdwire.RepErrPolicy, "TLS is not offered on this export")
	}
	return false, n.replyErr(opt, nbdwire.RepErrUnsupported, fmt.Sprintf("option %d not supported", opt))
}

// exportName answers NBD_OPT_EXPORT_NAME, which ends the negotiation
// with the export's size and flags or, having no way to say no, with the
// connection dropped.
func (n *negotiator) exportName(data []byte) (done bool, err error) {
	if n.sess.extended {
		// It cannot say which header style follows; qemu drops such
		// clients too, and GO is what they must use.
		return false, fmt.Errorf("%w: EXPORT_NAME after EXTENDED_HEADERS", ErrProtocol)
	}
	name := string(data)
	if !n.s.matches(name) {
		return false, fmt.Errorf("%w: unknown export %q", ErrProtocol, name)
	}
	n.finish(name)
	// INFO_EXPORT's payload but its type, then the zero padding.
	var b [2 + nbdwire.ExportNameReplySize + nbdwire.ExportNameZeroes]byte
	nbdwire.PutInfoExport(b[:], uint64(n.s.Export.Backend.Size()), n.sess.tflags)
	if n.sess.noZeroes {
		n.w.Write(b[2 : 2+nbdwire.ExportNameReplySize])
	} else {
		n.w.Write(b[2:])
	}
	return true, nil
}

// list answers NBD_OPT_LIST with the one export.
func (n *negotiator) list(data []byte) error {
	const opt = nbdwire.OptList
	if len(data) != 0 {
		return n.replyErr(opt, nbdwire.RepErrInvalid, "LIST takes no data")
	}
	name := n.s.Export.Name
	p := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	p = append(p, name...)
	p = append(p, n.s.Export.Description...)
	if err := n.reply(opt, nbdwire.RepServer, p); err != nil {
		return err
	}
	return n.reply(opt, nbdwire.RepAck, nil)
}

// headerStyle answers NBD_OPT_STRUCTURED_REPLY and
// NBD_OPT_EXTENDED_HEADERS; extended headers imply structured replies,
// and neither may be asked for twice or after the other has been given.
func (n *negotiator) headerStyle(opt uint32, data []byte) error {
	switch {
	case len(data) != 0 && opt == nbdwire.OptStructuredReply:
		return n.replyErr(opt, nbdwire.RepErrInvalid, "STRUCTURED_REPLY takes no data")
	case len(data) != 0:
		return n.replyErr(opt, nbdwire.RepErrInvalid, "EXTENDED_HEADERS takes no data")
	case n.sess.extended:
		return n.replyErr(opt, nbdwire.RepErrInvalid, "extended headers already negotiated")
	case n.sess.structured && opt == nbdwire.OptStructuredReply:
		return n.replyErr(opt, nbdwire.RepErrInvalid, "structured replies already negotiated")
	}
	n.sess.structured = true
	n.sess.extended = opt == nbdwire.OptExtendedHeaders
	return n.reply(opt, nbdwire.RepAck, nil)
}

// infoGo answers NBD_OPT_INFO and NBD_OPT_GO.
//
//	C: u32 name length | name | u16 n | n x u16 info request
//	S: REP_INFO(EXPORT) [REP_INFO(NAME)] [REP_INFO(DESCRIPTION)] REP_INFO(BLOCK_SIZE) REP_ACK
func (n *negotiator) infoGo(opt uint32, data []byte) (bool, error) {
	if len(data) < 6 {
		return false, n.replyErr(opt, nbdwire.RepErrInvalid, "option data too short")
	}
	nl := binary.BigEndian.Uint32(data)
	if uint64(nl) > uint64(len(data)-6) {
		return false, n.replyErr(opt, nbdwire.RepErrInvalid, "name length past the option data")
	}
	name := string(data[4 : 4+nl])
	rest := data[4+nl:]
	nreq := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*nreq {
		return false, n.replyErr(opt, nbdwire.RepErrInvalid, "info request count does not match the option length")
	}
	if !n.s.matches(name) {
		return false, n.replyErr(opt, nbdwire.RepErrUnknown, fmt.Sprintf("no export named %q", name))
	}
	var wantName, wantDesc bool
	for i := 0; i < nreq; i++ {
		switch binary.BigEndian.Uint16(rest[2*i:]) {
		case nbdwire.InfoName:
			wantName = true
		case nbdwire.InfoDescription:
			wantDesc = true
		}
	}
	tflags := n.s.tflags(&n.sess)
	var p [nbdwire.InfoBlockSizeSize]byte
	nbdwire.PutInfoExport(p[:], uint64(n.s.Export.Backend.Size()), tflags)
	if err := n.reply(opt, nbdwire.RepInfo, p[:nbdwire.InfoExportSize]); err != nil {
		return false, err
	}
	if wantName {
		b := binary.BigEndian.AppendUint16(nil, nbdwire.InfoName)
		if err := n.reply(opt, nbdwire.RepInfo, append(b, n.s.Export.Name...)); err != nil {
			return false, err
		}
	}
	if wantDesc && n.s.Export.Description != "" {
		b := binary.BigEndian.AppendUint16(nil, nbdwire.InfoDescription)
		if err := n.reply(opt, nbdwire.RepInfo, append(b, n.s.Export.Description...)); err != nil {
			return false, err
		}
	}
	// Always sent, as qemu does: clients that did not ask still learn the
	// payload cap, which saves them from an EINVAL on a huge read.
	nbdwire.PutInfoBlockSize(p[:], nbdwire.BlockSize{Minimum: 1, Preferred: preferredBlock, MaxPayload: MaxPayload})
	if err := n.reply(opt, nbdwire.RepInfo, p[:nbdwire.InfoBlockSizeSize]); err != nil {
		return false, err
	}
	if err := n.reply(opt, nbdwire.RepAck, nil); err != nil {
		return false, err
	}
	if opt == nbdwire.OptGo {
		n.finish(name)
		return true, nil
	}
	return false, nil
}

// finish fixes the session for transmission on export name.
func (n *negotiator) finish(name string) {
	// Contexts chosen by SET_META_CONTEXT carry over: this server has one
	// export, and both names were matched against it.
	n.sess.tflags = n.s.tflags(&n.sess)
}

// metaContext answers LIST_META_CONTEXT and SET_META_CONTEXT.
//
//	C: u32 name length | name | u32 n | n x (u32 length | query)
//	S: REP_META_CONTEXT (u32 id | name) per context ... REP_ACK
func (n *negotiator) metaContext(opt uint32, data []byte) error {
	if opt == nbdwire.OptSetMetaContext && !n.sess.structured {
		return n.replyErr(opt, nbdwire.RepErrInvalid, "SET_META_CONTEXT needs structured replies")
	}
	if len(data) < 8 {
		return n.replyErr(opt, nbdwire.RepErrInvalid, "option data too short")
	}
	nl := binary.BigEndian.Uint32(data)
	if uint64(nl) > uint64(len(data)-8) || nl > nbdwire.MaxStringLen {
		return n.replyErr(opt, nbdwire.RepErrInvalid, "bad export name length")
	}
	name := string(data[4 : 4+nl])
	rest := data[4+nl:]
	nq := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	// Parse every query before answering any, so a malformed list gets
	// one error and no half answer.
	var alloc, depth bool
	for i := uint32(0); i < nq; i++ {
		if len(rest) < 4 {
			return n.replyErr(opt, nbdwire.RepErrInvalid, "query count past the option data")
		}
		ql := binary.BigEndian.Uint32(rest)
		if uint64(ql) > uint64(len(rest)-4) || ql > nbdwire.MaxStringLen {
			return n.replyErr(opt, nbdwire.RepErrInvalid, "query length past the option data")
		}
		q := string(rest[4 : 4+ql])
		rest = rest[4+ql:]
		switch q {
		case nameBaseAllocation:
			alloc = true
		case nameAllocDepth:
			depth = true
		case "base:":
			if opt == nbdwire.OptListMetaContext {
				alloc = true
			}
		case "qemu:":
			if opt == nbdwire.OptListMetaContext {
				depth = true
			}
		}
	}
	if len(rest) != 0 {
		return n.replyErr(opt, nbdwire.RepErrInvalid, "trailing bytes after the queries")
	}
	if !n.s.matches(name) {
		return n.replyErr(opt, nbdwire.RepErrUnknown, fmt.Sprintf("no export named %q", name))
	}
	if nq == 0 && opt == nbdwire.OptListMetaContext {
		alloc, depth = true, true
	}
	send := func(id uint32, ctx string) error {
		if opt == nbdwire.OptListMetaContext {
			id = 0
		}
		p := binary.BigEndian.AppendUint32(nil, id)
		return n.reply(opt, nbdwire.RepMetaContext, append(p, ctx...))
	}
	if alloc {
		if err := send(ctxBaseAllocation, nameBaseAllocation); err != nil {
			return err
		}
	}
	if depth {
		if err := send(ctxAllocDepth, nameAllocDepth); err != nil {
			return err
		}
	}
	if opt == nbdwire.OptSetMetaContext {
		n.sess.metaAlloc, n.sess.metaDepth, n.sess.metaFor = alloc, depth, name
	}
	return n.reply(opt, nbdwire.RepAck, nil)
}

// reply queues one option reply.
func (n *negotiator) reply(opt, typ uint32, data []byte) error {
	var h [nbdwire.OptionReplyHeaderSize]byte
	nbdwire.PutOptionReplyHeader(h[:], nbdwire.OptionReply{Option: opt, Type: typ, Length: uint32(len(data))})
	n.w.Write(h[:])
	_, err := n.w.Write(data)
	return err
}

// replyErr sends an error reply carrying a message for people.
func (n *negotiator) replyErr(opt, typ uint32, msg string) error {
	return n.reply(opt, typ, []byte(msg))
}
