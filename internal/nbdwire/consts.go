package nbdwire

import "strconv"

// Magic numbers.
const (
	MagicNBD         = 0x4e42444d41474943 // "NBDMAGIC", the greeting's first word
	MagicOption      = 0x49484156454f5054 // "IHAVEOPT": newstyle greeting, and each option
	MagicOldstyle    = 0x00420281861253   // the obsolete oldstyle greeting
	MagicOptionReply = 0x3e889045565a9
	MagicRequest     = 0x25609513
	MagicExtRequest  = 0x21e41c71
	MagicSimpleReply = 0x67446698
	MagicChunkReply  = 0x668e33ef // a structured reply chunk
	MagicExtReply    = 0x6e8a278c
)

// Header sizes in bytes.
const (
	GreetingSize          = 18
	OptionHeaderSize      = 16
	OptionReplyHeaderSize = 20
	RequestSize           = 28
	ExtRequestSize        = 32
	SimpleReplySize       = 16
	ChunkHeaderSize       = 20
	ExtReplyHeaderSize    = 32
	// ExportNameReplySize is NBD_OPT_EXPORT_NAME's answer (size and
	// flags); ExportNameZeroes of padding follow unless both sides set
	// NO_ZEROES.
	ExportNameReplySize = 10
	ExportNameZeroes    = 124
)

// Handshake flags (the server's) and client flags.
const (
	FlagFixedNewstyle       = 1 << 0
	FlagNoZeroes            = 1 << 1
	ClientFlagFixedNewstyle = 1 << 0
	ClientFlagNoZeroes      = 1 << 1
)

// Options.
const (
	OptExportName      = 1
	OptAbort           = 2
	OptList            = 3
	OptStartTLS        = 5
	OptInfo            = 6
	OptGo              = 7
	OptStructuredReply = 8
	OptListMetaContext = 9
	OptSetMetaContext  = 10
	OptExtendedHeaders = 11
)

// Option reply types. Errors have RepErrorBit set.
const (
	RepAck              = 1
	RepServer           = 2
	RepInfo             = 3
	RepMetaContext      = 4
	RepErrorBit         = 1 << 31
	RepErrUnsupported   = RepErrorBit | 1
	RepErrPolicy        = RepErrorBit | 2
	RepErrInvalid       = RepErrorBit | 3
	RepErrPlatform      = RepErrorBit | 4
	RepErrTLSRequired   = RepErrorBit | 5
	RepErrUnknown       = RepErrorBit | 6
	RepErrShutdown      = RepErrorBit | 7
	RepErrBlockSizeReqd = RepErrorBit | 8
	RepErrTooBig        = RepErrorBit | 9
	RepErrExtHeaderReqd = RepErrorBit | 10
)

// NBD_INFO types, the first u16 of an NBD_REP_INFO payload.
const (
	InfoExport      = 0
	InfoName        = 1
	InfoDescription = 2
	InfoBlockSize   = 3
)

// Payload sizes of the fixed-size infos, their type included.
const (
	InfoExportSize    = 12
	InfoBlockSizeSize = 14
)

// Transmission flags.
const (
	TransHasFlags        = 1 << 0
	TransReadOnly        = 1 << 1
	TransSendFlush       = 1 << 2
	TransSendFUA         = 1 << 3
	TransRotational      = 1 << 4
	TransSendTrim        = 1 << 5
	TransSendWriteZeroes = 1 << 6
	TransSendDF          = 1 << 7
	TransCanMultiConn    = 1 << 8
	TransSendResize      = 1 << 9
	TransSendCache       = 1 << 10
	TransSendFastZero    = 1 << 11
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

// Structured reply chunk flags and types. Error types have ChunkErrorBit
// set.
const (
	ChunkFlagDone       = 1 << 0
	ChunkNone           = 0
	ChunkOffsetData     = 1
	ChunkOffsetHole     = 2
	ChunkBlockStatus    = 5
	ChunkBlockStatusExt = 6
	ChunkErrorBit       = 1 << 15
	ChunkError          = ChunkErrorBit | 1
	ChunkErrorOffset    = ChunkErrorBit | 2
)

// Error values of replies. They are the protocol's, not the host's errno
// numbers, though they agree with Linux's.
const (
	ErrnoPerm     = 1
	ErrnoIO       = 5
	ErrnoNoMem    = 12
	ErrnoInval    = 22
	ErrnoNoSpace  = 28
	ErrnoOverflow = 75
	ErrnoNotSup   = 95
	ErrnoShutdown = 108
)

// base:allocation's extent flags.
const (
	StateHole = 1 << 0
	StateZero = 1 << 1
)

// Limits the protocol sets.
const (
	// MaxStringLen caps names, queries and messages.
	MaxStringLen = 4096
	// DefaultMaxPayload is the largest payload a client may send a server
	// that announced no block size.
	DefaultMaxPayload = 32 << 20
)

// MetaBaseAllocation is the meta context every block-status peer knows.
const MetaBaseAllocation = "base:allocation"

var cmdNames = [...]string{"READ", "WRITE", "DISC", "FLUSH", "TRIM", "CACHE", "WRITE_ZEROES", "BLOCK_STATUS"}

// CmdName names a command for messages ("READ"); unknown ones "CMD_<n>".
func CmdName(cmd uint16) string {
	if int(cmd) < len(cmdNames) {
		return cmdNames[cmd]
	}
	return "CMD_" + strconv.Itoa(int(cmd))
}
