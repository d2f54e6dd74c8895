package nbdkernel

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/blktap-go/blktap/internal/nbdwire"
)

// maxReply bounds one option reply a server may send us; GO's replies are
// a few dozen bytes, and an error message is at most 4096.
const maxReply = 64 << 10

// maxReplies bounds the replies to one GO, so a server cannot keep us
// reading forever.
const maxReplies = 256

// ErrProtocol is the class of errors about what the server sent.
var ErrProtocol = errors.New("nbdkernel: NBD protocol error")

// ErrRefused means the server answered NBD_OPT_GO with an error (no such
// export, TLS required, ...). The error text carries the server's message.
var ErrRefused = errors.New("nbdkernel: server refused the export")

// Export is what the handshake learned about the export.
type Export struct {
	Size  int64
	Flags uint16 // transmission flags, as the kernel wants them
	// Block size constraints; zero when the server sent none.
	MinBlock, PreferredBlock, MaxPayload uint32
}

// ReadOnly reports whether the server exports the disk read-only.
func (e Export) ReadOnly() bool { return e.Flags&nbdwire.TransReadOnly != 0 }

// handshake runs the client side of fixed newstyle negotiation on rw up to
// the transmission phase, asking for no structured replies: the kernel
// only understands simple ones. It does nothing but read and write rw.
func handshake(rw io.ReadWriter, export string) (Export, error) {
	if len(export) > nbdwire.MaxStringLen {
		return Export{}, fmt.Errorf("nbdkernel: export name of %d bytes; NBD allows %d", len(export), nbdwire.MaxStringLen)
	}
	r := bufio.NewReader(rw)
	noZeroes, err := readGreeting(r)
	if err != nil {
		return Export{}, err
	}
	clientFlags := uint32(nbdwire.ClientFlagFixedNewstyle)
	if noZeroes {
		clientFlags |= nbdwire.ClientFlagNoZeroes
	}
	// Client flags and GO go out in one write.
	b := binary.BigEndian.AppendUint32(nil, clientFlags)
	b = nbdwire.AppendOption(b, nbdwire.OptGo, nbdwire.AppendInfoQuery(nil, export, nbdwire.InfoBlockSize))
	if _, err := rw.Write(b); err != nil {
		return Export{}, fmt.Errorf("nbdkernel: sending NBD_OPT_GO: %w", err)
	}
	return readGoReplies(r, rw, export, noZeroes)
}

// readGreeting reads the server's greeting and reports whether it offers
// to drop the zero padding.
func readGreeting(r *bufio.Reader) (noZeroes bool, err error) {
	var g [nbdwire.GreetingSize]byte
	if _, err := io.ReadFull(r, g[:]); err != nil {
		return false, fmt.Errorf("%w: reading the greeting: %w", ErrProtocol, err)
	}
	flags, err := nbdwire.ParseGreeting(g[:])
	switch {
	case errors.Is(err, nbdwire.ErrOldstyle):
		// Gone from servers since 2012.
		return false, fmt.Errorf("%w: server does not speak newstyle negotiation (oldstyle greeting)", ErrProtocol)
	case err != nil:
		return false, fmt.Errorf("%w: not an NBD server: %w", ErrProtocol, err)
	case flags&nbdwire.FlagFixedNewstyle == 0:
		return false, fmt.Errorf("%w: server does not speak fixed newstyle negotiation", ErrProtocol)
	}
	return flags&nbdwire.FlagNoZeroes != 0, nil
}

// readGoReplies reads the replies to NBD_OPT_GO up to its ACK.
func readGoReplies(r *bufio.Reader, w io.Writer, export string, noZeroes bool) (Export, error) {
	var e Export
	haveExport := false
	for range maxReplies {
		typ, data, err := readGoReply(r)
		if err != nil {
			return e, err
		}
		switch {
		case typ == nbdwire.RepAck:
			return e, checkAck(r, data, haveExport)
		case typ == nbdwire.RepErrUnsupported:
			// A server from before GO (NBD 3.10 / qemu 2.10).
			return exportName(r, w, export, noZeroes)
		case typ&nbdwire.RepErrorBit != 0:
			return e, fmt.Errorf("%w %q: %s (reply %#x)", ErrRefused, export, printable(data), typ)
		case typ == nbdwire.RepInfo:
			isExport, err := info(&e, data)
			if err != nil {
				return e, err
			}
			haveExport = haveExport || isExport
		default:
			// Unknown reply types are the server's business.
		}
	}
	return e, fmt.Errorf("%w: more than %d replies to NBD_OPT_GO", ErrProtocol, maxReplies)
}

// readGoReply reads one reply to NBD_OPT_GO.
func readGoReply(r *bufio.Reader) (typ uint32, data []byte, err error) {
	var h [nbdwire.OptionReplyHeaderSize]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, nil, fmt.Errorf("%w: reading a reply to NBD_OPT_GO: %w", ErrProtocol, err)
	}
	rh, err := nbdwire.ParseOptionReplyHeader(h[:])
	switch {
	case err != nil:
		return 0, nil, fmt.Errorf("%w: %w", ErrProtocol, err)
	case rh.Option != nbdwire.OptGo:
		return 0, nil, fmt.Errorf("%w: reply to option %d, we sent NBD_OPT_GO", ErrProtocol, rh.Option)
	case rh.Length > maxReply:
		return 0, nil, fmt.Errorf("%w: option reply of %d bytes", ErrProtocol, rh.Length)
	}
	data = make([]byte, rh.Length)
	if _, err := io.ReadFull(r, data); err != nil {
		return 0, nil, fmt.Errorf("%w: reading a reply to NBD_OPT_GO: %w", ErrProtocol, err)
	}
	return rh.Type, data, nil
}

// checkAck checks that GO's ACK ends the negotiation cleanly.
func checkAck(r *bufio.Reader, data []byte, haveExport bool) error {
	switch {
	case len(data) != 0:
		return fmt.Errorf("%w: NBD_REP_ACK with %d bytes of data", ErrProtocol, len(data))
	case !haveExport:
		return fmt.Errorf("%w: NBD_OPT_GO acknowledged without NBD_INFO_EXPORT", ErrProtocol)
	case r.Buffered() != 0:
		// The kernel takes the socket from here; bytes we read ahead
		// would be lost to it.
		return fmt.Errorf("%w: %d unexpected bytes after NBD_OPT_GO's ACK", ErrProtocol, r.Buffered())
	}
	return nil
}

// info decodes one NBD_REP_INFO payload into e and reports whether it was
// NBD_INFO_EXPORT.
func info(e *Export, d []byte) (isExport bool, err error) {
	typ, rest, err := nbdwire.ParseInfo(d)
	if err != nil {
		return false, fmt.Errorf("%w: %w", ErrProtocol, err)
	}
	switch typ {
	case nbdwire.InfoExport:
		size, flags, _ := nbdwire.ParseExport(rest)
		return true, setExport(e, size, flags)
	case nbdwire.InfoBlockSize:
		bs, _ := nbdwire.ParseBlockSize(rest)
		e.MinBlock, e.PreferredBlock, e.MaxPayload = bs.Minimum, bs.Preferred, bs.MaxPayload
		if e.MinBlock == 0 || e.MinBlock&(e.MinBlock-1) != 0 || e.MinBlock > 64<<10 {
			return false, fmt.Errorf("%w: minimum block size %d is not a power of 2 up to 64 KiB", ErrProtocol, e.MinBlock)
		}
	}
	return false, nil
}

func setExport(e *Export, size uint64, flags uint16) error {
	if size > 1<<63-1 {
		return fmt.Errorf("%w: export size %d", ErrProtocol, size)
	}
	if flags&nbdwire.TransHasFlags == 0 {
		return fmt.Errorf("%w: transmission flags %#x lack HAS_FLAGS", ErrProtocol, flags)
	}
	e.Size, e.Flags = int64(size), flags
	return nil
}

// exportName falls back to NBD_OPT_EXPORT_NAME, which a server answers
// with the export's size and flags, or by hanging up.
func exportName(r *bufio.Reader, w io.Writer, export string, noZeroes bool) (Export, error) {
	var e Export
	if _, err := w.Write(nbdwire.AppendOption(nil, nbdwire.OptExportName, []byte(export))); err != nil {
		return e, fmt.Errorf("nbdkernel: sending NBD_OPT_EXPORT_NAME: %w", err)
	}
	n := nbdwire.ExportNameReplySize + nbdwire.ExportNameZeroes
	if noZeroes {
		n = nbdwire.ExportNameReplySize
	}
	d := make([]byte, n)
	if _, err := io.ReadFull(r, d); err != nil {
		if errors.Is(err, io.EOF) {
			return e, fmt.Errorf("%w %q: the server hung up on NBD_OPT_EXPORT_NAME", ErrRefused, export)
		}
		return e, fmt.Errorf("%w: reading the NBD_OPT_EXPORT_NAME reply: %w", ErrProtocol, err)
	}
	size, flags, _ := nbdwire.ParseExport(d)
	err := setExport(&e, size, flags)
	return e, err
}

// printable cuts a server's message to something safe to show.
func printable(b []byte) string {
	if len(b) > 256 {
		b = b[:256]
	}
	out := make([]rune, 0, len(b))
	for _, c := range string(b) {
		if c < ' ' || c == 0x7f {
			c = '?'
		}
		out = append(out, c)
	}
	return string(out)
}
