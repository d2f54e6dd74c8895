package nbdkernel

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Wire constants of the client side (NBD proto.md; WIRE.md section 5).
const (
	magicNBD      = 0x4e42444d41474943 // "NBDMAGIC"
	magicIHaveOpt = 0x49484156454F5054 // "IHAVEOPT"
	magicOptReply = 0x3e889045565a9

	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	optExportName = 1
	optGo         = 7

	repAck      = 1
	repInfo     = 3
	repErrBit   = 1 << 31
	repErrUnsup = repErrBit | 1

	infoExport    = 0
	infoBlockSize = 3

	// Transmission flags the package looks at.
	FlagHasFlags = 1 << 0
	FlagReadOnly = 1 << 1
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
func (e Export) ReadOnly() bool { return e.Flags&FlagReadOnly != 0 }

// handshake runs the client side of fixed newstyle negotiation on rw up to
// the transmission phase, asking for no structured replies: the kernel
// only understands simple ones. It does nothing but read and write rw.
func handshake(rw io.ReadWriter, export string) (Export, error) {
	var e Export
	if len(export) > 4096 {
		return e, fmt.Errorf("nbdkernel: export name of %d bytes; NBD allows 4096", len(export))
	}
	r := bufio.NewReader(rw)
	var g [18]byte
	if _, err := io.ReadFull(r, g[:]); err != nil {
		return e, fmt.Errorf("%w: reading the greeting: %w", ErrProtocol, err)
	}
	if binary.BigEndian.Uint64(g[:]) != magicNBD {
		return e, fmt.Errorf("%w: not an NBD server (greeting % x)", ErrProtocol, g[:8])
	}
	if m := binary.BigEndian.Uint64(g[8:]); m != magicIHaveOpt {
		// 0x00420281861253 is oldstyle, gone from servers since 2012.
		return e, fmt.Errorf("%w: server does not speak newstyle negotiation (magic %#x)", ErrProtocol, m)
	}
	hflags := binary.BigEndian.Uint16(g[16:])
	if hflags&flagFixedNewstyle == 0 {
		return e, fmt.Errorf("%w: server does not speak fixed newstyle negotiation", ErrProtocol)
	}
	noZeroes := hflags&flagNoZeroes != 0
	cflags := uint32(flagFixedNewstyle)
	if noZeroes {
		cflags |= flagNoZeroes
	}

	// Client flags and GO go out in one write.
	b := binary.BigEndian.AppendUint32(nil, cflags)
	b = binary.BigEndian.AppendUint64(b, magicIHaveOpt)
	b = binary.BigEndian.AppendUint32(b, optGo)
	b = binary.BigEndian.AppendUint32(b, uint32(4+len(export)+2+2))
	b = binary.BigEndian.AppendUint32(b, uint32(len(export)))
	b = append(b, export...)
	b = binary.BigEndian.AppendUint16(b, 1)
	b = binary.BigEndian.AppendUint16(b, infoBlockSize)
	if _, err := rw.Write(b); err != nil {
		return e, fmt.Errorf("nbdkernel: sending NBD_OPT_GO: %w", err)
	}

	haveExport := false
	for i := 0; ; i++ {
		if i == maxReplies {
			return e, fmt.Errorf("%w: more than %d replies to NBD_OPT_GO", ErrProtocol, maxReplies)
		}
		var h [20]byte
		if _, err := io.ReadFull(r, h[:]); err != nil {
			return e, fmt.Errorf("%w: reading a reply to NBD_OPT_GO: %w", ErrProtocol, err)
		}
		if m := binary.BigEndian.Uint64(h[:]); m != magicOptReply {
			return e, fmt.Errorf("%w: bad option reply magic %#x", ErrProtocol, m)
		}
		if o := binary.BigEndian.Uint32(h[8:]); o != optGo {
			return e, fmt.Errorf("%w: reply to option %d, we sent NBD_OPT_GO", ErrProtocol, o)
		}
		typ := binary.BigEndian.Uint32(h[12:])
		n := binary.BigEndian.Uint32(h[16:])
		if n > maxReply {
			return e, fmt.Errorf("%w: option reply of %d bytes", ErrProtocol, n)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(r, data); err != nil {
			return e, fmt.Errorf("%w: reading a reply to NBD_OPT_GO: %w", ErrProtocol, err)
		}
		switch {
		case typ == repAck:
			if len(data) != 0 {
				return e, fmt.Errorf("%w: NBD_REP_ACK with %d bytes of data", ErrProtocol, len(data))
			}
			if !haveExport {
				return e, fmt.Errorf("%w: NBD_OPT_GO acknowledged without NBD_INFO_EXPORT", ErrProtocol)
			}
			if r.Buffered() != 0 {
				// The kernel takes the socket from here; bytes we
				// read ahead would be lost to it.
				return e, fmt.Errorf("%w: %d unexpected bytes after NBD_OPT_GO's ACK", ErrProtocol, r.Buffered())
			}
			return e, nil
		case typ == repErrUnsup:
			// A server from before GO (NBD 3.10 / qemu 2.10).
			return exportName(r, rw, export, noZeroes)
		case typ&repErrBit != 0:
			return e, fmt.Errorf("%w %q: %s (reply %#x)", ErrRefused, export, printable(data), typ)
		case typ == repInfo:
			if err := info(&e, data); err != nil {
				return e, err
			}
			if len(data) >= 2 && binary.BigEndian.Uint16(data) == infoExport {
				haveExport = true
			}
		default:
			// Unknown reply types are the server's business.
		}
	}
}

// info decodes one NBD_REP_INFO payload into e.
//
//	EXPORT:     u16 0 | u64 size | u16 transmission flags      (12 bytes)
//	BLOCK_SIZE: u16 3 | u32 minimum | u32 preferred | u32 max  (14 bytes)
func info(e *Export, d []byte) error {
	if len(d) < 2 {
		return fmt.Errorf("%w: NBD_REP_INFO of %d bytes", ErrProtocol, len(d))
	}
	switch binary.BigEndian.Uint16(d) {
	case infoExport:
		if len(d) != 12 {
			return fmt.Errorf("%w: NBD_INFO_EXPORT of %d bytes, want 12", ErrProtocol, len(d))
		}
		return setExport(e, binary.BigEndian.Uint64(d[2:]), binary.BigEndian.Uint16(d[10:]))
	case infoBlockSize:
		if len(d) != 14 {
			return fmt.Errorf("%w: NBD_INFO_BLOCK_SIZE of %d bytes, want 14", ErrProtocol, len(d))
		}
		e.MinBlock = binary.BigEndian.Uint32(d[2:])
		e.PreferredBlock = binary.BigEndian.Uint32(d[6:])
		e.MaxPayload = binary.BigEndian.Uint32(d[10:])
		if e.MinBlock == 0 || e.MinBlock&(e.MinBlock-1) != 0 || e.MinBlock > 64<<10 {
			return fmt.Errorf("%w: minimum block size %d is not a power of 2 up to 64 KiB", ErrProtocol, e.MinBlock)
		}
	}
	return nil
}

func setExport(e *Export, size uint64, flags uint16) error {
	if size > 1<<63-1 {
		return fmt.Errorf("%w: export size %d", ErrProtocol, size)
	}
	if flags&FlagHasFlags == 0 {
		return fmt.Errorf("%w: transmission flags %#x lack HAS_FLAGS", ErrProtocol, flags)
	}
	e.Size, e.Flags = int64(size), flags
	return nil
}

// exportName falls back to NBD_OPT_EXPORT_NAME, which a server answers
// with the export's size and flags, or by hanging up.
func exportName(r *bufio.Reader, w io.Writer, export string, noZeroes bool) (Export, error) {
	var e Export
	b := binary.BigEndian.AppendUint64(nil, magicIHaveOpt)
	b = binary.BigEndian.AppendUint32(b, optExportName)
	b = binary.BigEndian.AppendUint32(b, uint32(len(export)))
	b = append(b, export...)
	if _, err := w.Write(b); err != nil {
		return e, fmt.Errorf("nbdkernel: sending NBD_OPT_EXPORT_NAME: %w", err)
	}
	n := 8 + 2 + 124
	if noZeroes {
		n = 10
	}
	d := make([]byte, n)
	if _, err := io.ReadFull(r, d); err != nil {
		if errors.Is(err, io.EOF) {
			return e, fmt.Errorf("%w %q: the server hung up on NBD_OPT_EXPORT_NAME", ErrRefused, export)
		}
		return e, fmt.Errorf("%w: reading the NBD_OPT_EXPORT_NAME reply: %w", ErrProtocol, err)
	}
	err := setExport(&e, binary.BigEndian.Uint64(d), binary.BigEndian.Uint16(d[8:]))
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
