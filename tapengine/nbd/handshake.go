package nbd

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
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
	var hb [18]byte
	binary.BigEndian.PutUint64(hb[0:], magicNBD)
	binary.BigEndian.PutUint64(hb[8:], magicIHaveOpt)
	binary.BigEndian.PutUint16(hb[16:], flagFixedNewstyle|flagNoZeroes)
	n.w.Write(hb[:])
	if err := n.w.Flush(); err != nil {
		return nil, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(n.r, cf[:]); err != nil {
		return nil, fmt.Errorf("nbd: reading client flags: %w", err)
	}
	flags := binary.BigEndian.Uint32(cf[:])
	if flags&^(flagCFixedNewstyle|flagCNoZeroes) != 0 {
		// The protocol makes unknown client flags fatal.
		return nil, fmt.Errorf("%w: unknown client flags %#x", ErrProtocol, flags)
	}
	n.sess.noZeroes = flags&flagCNoZeroes != 0
	if n.tlsRequired && flags&flagCFixedNewstyle == 0 {
		// TLS needs fixed newstyle, and without TLS this server
		// serves nothing: the client can never get anywhere.
		return nil, fmt.Errorf("%w: TLS is required but the client did not set FIXED_NEWSTYLE", ErrProtocol)
	}

	for i := 0; i < maxOptions; i++ {
		var oh [16]byte
		if _, err := io.ReadFull(n.r, oh[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil, errAborted
			}
			return nil, fmt.Errorf("nbd: reading option header: %w", err)
		}
		if m := binary.BigEndian.Uint64(oh[:]); m != magicIHaveOpt {
			return nil, fmt.Errorf("%w: bad option magic %#x", ErrProtocol, m)
		}
		opt := binary.BigEndian.Uint32(oh[8:])
		length := binary.BigEndian.Uint32(oh[12:])
		if length > maxOptionLen {
			// Skip the data so the stream stays in frame, then refuse.
			if _, err := io.CopyN(io.Discard, n.r, int64(length)); err != nil {
				return nil, fmt.Errorf("nbd: skipping option %d: %w", opt, err)
			}
			if opt == optExportName {
				return nil, fmt.Errorf("%w: export name of %d bytes", ErrProtocol, length)
			}
			if n.tlsRequired && !n.tlsDone && opt != optAbort {
				n.replyErr(opt, repErrTLSReqd, msgTLSReqd)
			} else {
				n.replyErr(opt, repErrTooBig, "option data too long")
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
	case optAbort:
		return false, nil
	case optExportName:
		// The one option that cannot be answered with an error.
		return true, fmt.Errorf("%w: EXPORT_NAME before STARTTLS on a TLS-only server", ErrProtocol)
	case optStartTLS:
		if len(data) != 0 {
			return true, n.replyErr(opt, repErrInvalid, "STARTTLS takes no data")
		}
		if err := n.reply(opt, repAck, nil); err != nil {
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
	return true, n.replyErr(opt, repErrTLSReqd, msgTLSReqd)
}

// option answers one option. done reports the move to transmission.
func (n *negotiator) option(opt uint32, data []byte) (done bool, err error) {
	if n.tlsRequired && !n.tlsDone {
		if handled, err := n.beforeTLS(opt, data); handled || err != nil {
			return false, err
		}
	}
	switch opt {
	case optExportName:
		if n.sess.extended {
			// It cannot say which header style follows; qemu drops
			// such clients too, and GO is what they must use.
			return false, fmt.Errorf("%w: EXPORT_NAME after EXTENDED_HEADERS", ErrProtocol)
		}
		name := string(data)
		if !n.s.matches(name) {
			// EXPORT_NAME has no way to say no but hanging up.
			return false, fmt.Errorf("%w: unknown export %q", ErrProtocol, name)
		}
		n.finish(name)
		var b [8 + 2 + 124]byte
		binary.BigEndian.PutUint64(b[0:], uint64(n.s.Export.Backend.Size()))
		binary.BigEndian.PutUint16(b[8:], n.sess.tflags)
		if n.sess.noZeroes {
			n.w.Write(b[:10])
		} else {
			n.w.Write(b[:])
		}
		return true, nil

	case optAbort:
		// The client hangs up after our ACK; some never read it, so a
		// failed write is no error.
		n.reply(opt, repAck, nil)
		n.w.Flush()
		return false, errAborted

	case optList:
		if len(data) != 0 {
			return false, n.replyErr(opt, repErrInvalid, "LIST takes no data")
		}
		name := n.s.Export.Name
		p := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
		p = append(p, name...)
		p = append(p, n.s.Export.Description...)
		if err := n.reply(opt, repServer, p); err != nil {
			return false, err
		}
		return false, n.reply(opt, repAck, nil)

	case optInfo, optGo:
		return n.infoGo(opt, data)

	case optStructuredReply:
		switch {
		case len(data) != 0:
			return false, n.replyErr(opt, repErrInvalid, "STRUCTURED_REPLY takes no data")
		case n.sess.extended:
			return false, n.replyErr(opt, repErrInvalid, "extended headers already negotiated")
		case n.sess.structured:
			return false, n.replyErr(opt, repErrInvalid, "structured replies already negotiated")
		}
		n.sess.structured = true
		return false, n.reply(opt, repAck, nil)

	case optExtendedHeaders:
		switch {
		case len(data) != 0:
			return false, n.replyErr(opt, repErrInvalid, "EXTENDED_HEADERS takes no data")
		case n.sess.extended:
			return false, n.replyErr(opt, repErrInvalid, "extended headers already negotiated")
		}
		n.sess.extended = true
		n.sess.structured = true
		return false, n.reply(opt, repAck, nil)

	case optListMetaContext, optSetMetaContext:
		return false, n.metaContext(opt, data)

	case optStartTLS:
		if n.tlsDone {
			return false, n.replyErr(opt, repErrInvalid, "TLS is already running")
		}
		return false, n.replyErr(opt, repErrPolicy, "TLS is not offered on this export")
	}
	return false, n.replyErr(opt, repErrUnsup, fmt.Sprintf("option %d not supported", opt))
}

// infoGo answers NBD_OPT_INFO and NBD_OPT_GO.
//
//	C: u32 name length | name | u16 n | n x u16 info request
//	S: REP_INFO(EXPORT) [REP_INFO(NAME)] [REP_INFO(DESCRIPTION)] REP_INFO(BLOCK_SIZE) REP_ACK
func (n *negotiator) infoGo(opt uint32, data []byte) (bool, error) {
	if len(data) < 6 {
		return false, n.replyErr(opt, repErrInvalid, "option data too short")
	}
	nl := binary.BigEndian.Uint32(data)
	if uint64(nl) > uint64(len(data)-6) {
		return false, n.replyErr(opt, repErrInvalid, "name length past the option data")
	}
	name := string(data[4 : 4+nl])
	rest := data[4+nl:]
	nreq := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*nreq {
		return false, n.replyErr(opt, repErrInvalid, "info request count does not match the option length")
	}
	if !n.s.matches(name) {
		return false, n.replyErr(opt, repErrUnknown, fmt.Sprintf("no export named %q", name))
	}
	var wantName, wantDesc bool
	for i := 0; i < nreq; i++ {
		switch binary.BigEndian.Uint16(rest[2*i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		}
	}
	tflags := n.s.tflags(&n.sess)
	var p [14]byte
	binary.BigEndian.PutUint16(p[0:], infoExport)
	binary.BigEndian.PutUint64(p[2:], uint64(n.s.Export.Backend.Size()))
	binary.BigEndian.PutUint16(p[10:], tflags)
	if err := n.reply(opt, repInfo, p[:12]); err != nil {
		return false, err
	}
	if wantName {
		b := binary.BigEndian.AppendUint16(nil, infoName)
		if err := n.reply(opt, repInfo, append(b, n.s.Export.Name...)); err != nil {
			return false, err
		}
	}
	if wantDesc && n.s.Export.Description != "" {
		b := binary.BigEndian.AppendUint16(nil, infoDescription)
		if err := n.reply(opt, repInfo, append(b, n.s.Export.Description...)); err != nil {
			return false, err
		}
	}
	// Always sent, as qemu does: clients that did not ask still learn the
	// payload cap, which saves them from an EINVAL on a huge read.
	binary.BigEndian.PutUint16(p[0:], infoBlockSize)
	binary.BigEndian.PutUint32(p[2:], 1)
	binary.BigEndian.PutUint32(p[6:], preferredBlock)
	binary.BigEndian.PutUint32(p[10:], MaxPayload)
	if err := n.reply(opt, repInfo, p[:14]); err != nil {
		return false, err
	}
	if err := n.reply(opt, repAck, nil); err != nil {
		return false, err
	}
	if opt == optGo {
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
	if opt == optSetMetaContext && !n.sess.structured {
		return n.replyErr(opt, repErrInvalid, "SET_META_CONTEXT needs structured replies")
	}
	if len(data) < 8 {
		return n.replyErr(opt, repErrInvalid, "option data too short")
	}
	nl := binary.BigEndian.Uint32(data)
	if uint64(nl) > uint64(len(data)-8) || nl > maxStringLen {
		return n.replyErr(opt, repErrInvalid, "bad export name length")
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
			return n.replyErr(opt, repErrInvalid, "query count past the option data")
		}
		ql := binary.BigEndian.Uint32(rest)
		if uint64(ql) > uint64(len(rest)-4) || ql > maxStringLen {
			return n.replyErr(opt, repErrInvalid, "query length past the option data")
		}
		q := string(rest[4 : 4+ql])
		rest = rest[4+ql:]
		switch q {
		case nameBaseAllocation:
			alloc = true
		case nameAllocDepth:
			depth = true
		case "base:":
			if opt == optListMetaContext {
				alloc = true
			}
		case "qemu:":
			if opt == optListMetaContext {
				depth = true
			}
		}
	}
	if len(rest) != 0 {
		return n.replyErr(opt, repErrInvalid, "trailing bytes after the queries")
	}
	if !n.s.matches(name) {
		return n.replyErr(opt, repErrUnknown, fmt.Sprintf("no export named %q", name))
	}
	if nq == 0 && opt == optListMetaContext {
		alloc, depth = true, true
	}
	send := func(id uint32, ctx string) error {
		if opt == optListMetaContext {
			id = 0
		}
		p := binary.BigEndian.AppendUint32(nil, id)
		return n.reply(opt, repMetaContext, append(p, ctx...))
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
	if opt == optSetMetaContext {
		n.sess.metaAlloc, n.sess.metaDepth, n.sess.metaFor = alloc, depth, name
	}
	return n.reply(opt, repAck, nil)
}

// reply queues one option reply.
//
//	+0 u64 magic 0x3e889045565a9 | +8 u32 option | +12 u32 type | +16 u32 length | data
func (n *negotiator) reply(opt, typ uint32, data []byte) error {
	var h [20]byte
	binary.BigEndian.PutUint64(h[0:], magicOptReply)
	binary.BigEndian.PutUint32(h[8:], opt)
	binary.BigEndian.PutUint32(h[12:], typ)
	binary.BigEndian.PutUint32(h[16:], uint32(len(data)))
	n.w.Write(h[:])
	_, err := n.w.Write(data)
	return err
}

// replyErr sends an error reply carrying a message for people.
func (n *negotiator) replyErr(opt, typ uint32, msg string) error {
	return n.reply(opt, typ, []byte(msg))
}
