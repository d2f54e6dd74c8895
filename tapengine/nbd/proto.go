package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Wire constants (WIRE.md section 5; NBD proto.md). All integers are
// big-endian on the wire.
const (
	magicNBD       = 0x4e42444d41474943 // "NBDMAGIC"
	magicIHaveOpt  = 0x49484156454F5054 // "IHAVEOPT"
	magicOptReply  = 0x3e889045565a9
	magicRequest   = 0x25609513
	magicExtReq    = 0x21e41c71
	magicSimple    = 0x67446698
	magicChunk     = 0x668e33ef
	magicExtReply  = 0x6e8a278c
	requestSize    = 28
	extRequestSize = 32
	simpleSize     = 16
	chunkHdrSize   = 20
	extReplySize   = 32
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle  = 1 << 0
	flagNoZeroes       = 1 << 1
	flagCFixedNewstyle = 1 << 0
	flagCNoZeroes      = 1 << 1
)

// Options.
const (
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10
	optExtendedHeaders = 11
)

// Option reply types.
const (
	repAck          = 1
	repServer       = 2
	repInfo         = 3
	repMetaContext  = 4
	repErrBit       = 1 << 31
	repErrUnsup     = repErrBit | 1
	repErrPolicy    = repErrBit | 2
	repErrInvalid   = repErrBit | 3
	repErrPlatform  = repErrBit | 4
	repErrTLSReqd   = repErrBit | 5
	repErrUnknown   = repErrBit | 6
	repErrShutdown  = repErrBit | 7
	repErrBlockSize = repErrBit | 8
	repErrTooBig    = repErrBit | 9
)

// NBD_INFO types.
const (
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3
)

// Transmission flags.
const (
	tflagHasFlags        = 1 << 0
	tflagReadOnly        = 1 << 1
	tflagSendFlush       = 1 << 2
	tflagSendFUA         = 1 << 3
	tflagRotational      = 1 << 4
	tflagSendTrim        = 1 << 5
	tflagSendWriteZeroes = 1 << 6
	tflagSendDF          = 1 << 7
	tflagCanMultiConn    = 1 << 8
	tflagSendCache       = 1 << 10
	tflagSendFastZero    = 1 << 11
)

// Commands.
const (
	CmdRead        = 0
	CmdWrite       = 1
	CmdDisc        = 2
	CmdFlush       = 3
	CmdTrim        = 4
	CmdCache       = 5
	CmdWriteZeroes = 6
	CmdBlockStatus = 7
)

// Command flags.
const (
	CmdFlagFUA        = 1 << 0
	CmdFlagNoHole     = 1 << 1
	CmdFlagDF         = 1 << 2
	CmdFlagReqOne     = 1 << 3
	CmdFlagFastZero   = 1 << 4
	CmdFlagPayloadLen = 1 << 5
)

// Structured reply chunk types and flags.
const (
	chunkFlagDone      = 1 << 0
	chunkNone          = 0
	chunkOffsetData    = 1
	chunkOffsetHole    = 2
	chunkBlockStatus   = 5
	chunkBlockStatusEx = 6
	chunkError         = 1<<15 + 1
	chunkErrorOffset   = 1<<15 + 2
)

// NBD error numbers (not the host's errno values: the protocol fixes them).
const (
	errPerm     = 1
	errIO       = 5
	errNoMem    = 12
	errInval    = 22
	errNoSpc    = 28
	errOverflow = 75
	errNotSup   = 95
	errShutdown = 108
)

// base:allocation flags.
const (
	stateHole = 1 << 0
	stateZero = 1 << 1
)

// Limits this server enforces on what peers send.
const (
	// MaxPayload is the largest READ or WRITE payload accepted, advertised
	// as NBD_INFO_BLOCK_SIZE's maximum. 32 MiB is what qemu and nbdkit use
	// and what clients assume when they are told nothing.
	MaxPayload = 32 << 20
	// MaxStreamed is the largest READ or WRITE served at all. Requests
	// above MaxPayload come from clients that negotiated no block size
	// (NBD_OPT_EXPORT_NAME) and assume nbdkit's 64 MiB; they are streamed
	// in streamChunk parts, never buffered whole.
	MaxStreamed = 64 << 20
	streamChunk = 4 << 20
	// maxOptionLen caps option data we read into memory; longer options
	// are skipped (read and discarded) and refused with ERR_TOO_BIG.
	maxOptionLen = 64 << 10
	// maxStringLen is the protocol's limit on names and messages.
	maxStringLen = 4096
	// preferredBlock is NBD_INFO_BLOCK_SIZE's preferred size.
	preferredBlock = 4096
)

// Request is one transmission-phase request as decoded from the wire.
// Length is 64-bit because extended headers carry a 64-bit length.
type Request struct {
	Flags  uint16
	Type   uint16
	Cookie uint64
	Offset uint64
	Length uint64
}

// ErrBadMagic means a request did not start with a request magic: the
// stream is out of frame and the connection must be dropped. Errors
// carrying it also match ErrProtocol.
var ErrBadMagic = errors.New("bad request magic")

// ErrProtocol is the class of every violation by a peer that ends its
// connection.
var ErrProtocol = errors.New("nbd: protocol violation")

// ParseRequest decodes a request header from b, which must hold at least
// 28 bytes (compact headers) or 32 bytes (extended headers, ext true).
// It does no I/O and never looks beyond the header it decodes.
//
//	compact request (28 bytes)              extended request (32 bytes)
//	+0  u32 magic 0x25609513               +0  u32 magic 0x21e41c71
//	+4  u16 command flags                  +4  u16 command flags
//	+6  u16 type                           +6  u16 type
//	+8  u64 cookie                         +8  u64 cookie
//	+16 u64 offset                         +16 u64 offset
//	+24 u32 length                         +24 u64 length
func ParseRequest(b []byte, ext bool) (Request, error) {
	var r Request
	n := requestSize
	want := uint32(magicRequest)
	if ext {
		n, want = extRequestSize, magicExtReq
	}
	if len(b) < n {
		return r, fmt.Errorf("%w: request header needs %d bytes, have %d", ErrProtocol, n, len(b))
	}
	if m := binary.BigEndian.Uint32(b); m != want {
		return r, fmt.Errorf("%w: %w %#x", ErrProtocol, ErrBadMagic, m)
	}
	r.Flags = binary.BigEndian.Uint16(b[4:])
	r.Type = binary.BigEndian.Uint16(b[6:])
	r.Cookie = binary.BigEndian.Uint64(b[8:])
	r.Offset = binary.BigEndian.Uint64(b[16:])
	if ext {
		r.Length = binary.BigEndian.Uint64(b[24:])
	} else {
		r.Length = uint64(binary.BigEndian.Uint32(b[24:]))
	}
	return r, nil
}

// AppendRequest encodes r (the client's side; used by tests and tools).
// With compact headers a Length above 2^32-1 is an error.
func AppendRequest(b []byte, r Request, ext bool) ([]byte, error) {
	if ext {
		b = binary.BigEndian.AppendUint32(b, magicExtReq)
	} else {
		if r.Length > 0xffffffff {
			return b, fmt.Errorf("nbd: length %d needs extended headers", r.Length)
		}
		b = binary.BigEndian.AppendUint32(b, magicRequest)
	}
	b = binary.BigEndian.AppendUint16(b, r.Flags)
	b = binary.BigEndian.AppendUint16(b, r.Type)
	b = binary.BigEndian.AppendUint64(b, r.Cookie)
	b = binary.BigEndian.AppendUint64(b, r.Offset)
	if ext {
		b = binary.BigEndian.AppendUint64(b, r.Length)
	} else {
		b = binary.BigEndian.AppendUint32(b, uint32(r.Length))
	}
	return b, nil
}

// putSimple writes a simple reply header into b[:16].
//
//	+0 u32 magic 0x67446698 | +4 u32 error | +8 u64 cookie
func putSimple(b []byte, errno uint32, cookie uint64) {
	binary.BigEndian.PutUint32(b, magicSimple)
	binary.BigEndian.PutUint32(b[4:], errno)
	binary.BigEndian.PutUint64(b[8:], cookie)
}

// putChunk writes a structured reply chunk header into b[:20].
//
//	+0 u32 magic 0x668e33ef | +4 u16 flags | +6 u16 type | +8 u64 cookie | +16 u32 length
func putChunk(b []byte, flags, typ uint16, cookie uint64, length uint32) {
	binary.BigEndian.PutUint32(b, magicChunk)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint32(b[16:], length)
}

// putExtReply writes an extended reply header into b[:32].
//
//	+0 u32 magic 0x6e8a278c | +4 u16 flags | +6 u16 type | +8 u64 cookie
//	+16 u64 offset (the request's) | +24 u64 payload length
func putExtReply(b []byte, flags, typ uint16, cookie, offset, length uint64) {
	binary.BigEndian.PutUint32(b, magicExtReply)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint64(b[16:], offset)
	binary.BigEndian.PutUint64(b[24:], length)
}
