package xenstore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
)

// PayloadMax is the largest payload either side may send (XENSTORE_PAYLOAD_MAX).
// A peer that announces more has broken the protocol: the connection is dropped.
const PayloadMax = 4096

// HeaderSize is the size of the fixed message header.
const HeaderSize = 16

// Op is a message type (the "type" field of the header).
type Op uint32

// Message types, numbered as in xs_wire.h.
const (
	OpControl            Op = 0 // also known as DEBUG
	OpDirectory          Op = 1
	OpRead               Op = 2
	OpGetPerms           Op = 3
	OpWatch              Op = 4
	OpUnwatch            Op = 5
	OpTransactionStart   Op = 6
	OpTransactionEnd     Op = 7
	OpIntroduce          Op = 8
	OpRelease            Op = 9
	OpGetDomainPath      Op = 10
	OpWrite              Op = 11
	OpMkdir              Op = 12
	OpRm                 Op = 13
	OpSetPerms           Op = 14
	OpWatchEvent         Op = 15 // server to client only
	OpError              Op = 16 // server to client only
	OpIsDomainIntroduced Op = 17
	OpResume             Op = 18
	OpSetTarget          Op = 19
	opRestrict           Op = 20 // removed from the protocol; invalid
	OpResetWatches       Op = 21
	OpDirectoryPart      Op = 22
	OpGetFeature         Op = 23
	OpSetFeature         Op = 24
	OpGetQuota           Op = 25
	OpSetQuota           Op = 26
	OpInvalid            Op = 0xffff
)

var opNames = [...]string{
	"CONTROL", "DIRECTORY", "READ", "GET_PERMS", "WATCH", "UNWATCH",
	"TRANSACTION_START", "TRANSACTION_END", "INTRODUCE", "RELEASE",
	"GET_DOMAIN_PATH", "WRITE", "MKDIR", "RM", "SET_PERMS", "WATCH_EVENT",
	"ERROR", "IS_DOMAIN_INTRODUCED", "RESUME", "SET_TARGET", "RESTRICT",
	"RESET_WATCHES", "DIRECTORY_PART", "GET_FEATURE", "SET_FEATURE",
	"GET_QUOTA", "SET_QUOTA",
}

func (o Op) String() string {
	if int(o) < len(opNames) {
		return opNames[o]
	}
	if o == OpInvalid {
		return "INVALID"
	}
	return "Op(" + strconv.FormatUint(uint64(o), 10) + ")"
}

// Message is one xenstore packet. Payload conventions depend on Type: see
// the package documentation.
type Message struct {
	Type  Op
	ReqID uint32
	TxID  uint32
	// Payload is at most PayloadMax bytes. Messages returned by a Decoder
	// own their payload.
	Payload []byte
}

// ErrPayloadTooBig is returned for a payload over PayloadMax, when encoding
// and when a decoded header announces one.
var ErrPayloadTooBig = errors.New("xenstore: payload exceeds 4096 bytes")

// Append appends the encoded message (header then payload) to dst.
// The header is in native byte order, which is little-endian on every
// architecture Xen supports.
func (m *Message) Append(dst []byte) ([]byte, error) {
	if len(m.Payload) > PayloadMax {
		return dst, fmt.Errorf("%w: %s with %d bytes", ErrPayloadTooBig, m.Type, len(m.Payload))
	}
	var h [HeaderSize]byte
	binary.LittleEndian.PutUint32(h[0:], uint32(m.Type))
	binary.LittleEndian.PutUint32(h[4:], m.ReqID)
	binary.LittleEndian.PutUint32(h[8:], m.TxID)
	binary.LittleEndian.PutUint32(h[12:], uint32(len(m.Payload)))
	dst = append(dst, h[:]...)
	return append(dst, m.Payload...), nil
}

func (m Message) String() string {
	return fmt.Sprintf("%s req=%d tx=%d %q", m.Type, m.ReqID, m.TxID, m.Payload)
}

// Decoder turns a byte stream into Messages. It does no I/O: Feed it what
// was read, then call Next until it reports no complete message. After an
// error the stream cannot be resynchronised and every Next returns it.
type Decoder struct {
	// Max is the largest payload accepted; 0 means PayloadMax. Only a
	// client may raise it: oxenstored sends DIRECTORY replies past 4096
	// bytes, which C clients cannot read but ours can.
	Max int

	buf []byte
	off int
	err error
}

// Feed appends p to the bytes waiting to be decoded. p is copied.
func (d *Decoder) Feed(p []byte) {
	if d.off > 0 && d.off == len(d.buf) {
		d.buf, d.off = d.buf[:0], 0
	} else if d.off > 64*1024 {
		n := copy(d.buf, d.buf[d.off:])
		d.buf, d.off = d.buf[:n], 0
	}
	d.buf = append(d.buf, p...)
}

// Buffered reports how many bytes are waiting.
func (d *Decoder) Buffered() int { return len(d.buf) - d.off }

// Next returns the next complete message. ok is false when more bytes are
// needed. A header announcing more than PayloadMax bytes is an error
// (ErrPayloadTooBig): the only safe reaction is to drop the connection.
func (d *Decoder) Next() (m Message, ok bool, err error) {
	if d.err != nil {
		return Message{}, false, d.err
	}
	b := d.buf[d.off:]
	if len(b) < HeaderSize {
		return Message{}, false, nil
	}
	n := binary.LittleEndian.Uint32(b[12:])
	limit := uint32(PayloadMax)
	if d.Max > 0 {
		limit = uint32(d.Max)
	}
	if n > limit {
		d.err = fmt.Errorf("%w: header announces %d", ErrPayloadTooBig, n)
		return Message{}, false, d.err
	}
	if len(b) < HeaderSize+int(n) {
		return Message{}, false, nil
	}
	m = Message{
		Type:    Op(binary.LittleEndian.Uint32(b[0:])),
		ReqID:   binary.LittleEndian.Uint32(b[4:]),
		TxID:    binary.LittleEndian.Uint32(b[8:]),
		Payload: append([]byte(nil), b[HeaderSize:HeaderSize+int(n)]...),
	}
	d.off += HeaderSize + int(n)
	return m, true, nil
}

// splitStrings splits a payload of NUL-terminated strings. The payload
// must end with a NUL; a missing terminator is reported as !ok.
func splitStrings(p []byte) (parts []string, ok bool) {
	if len(p) == 0 || p[len(p)-1] != 0 {
		return nil, false
	}
	start := 0
	for i, c := range p {
		if c == 0 {
			parts = append(parts, string(p[start:i]))
			start = i + 1
		}
	}
	return parts, true
}

// joinStrings encodes strings each followed by a NUL.
func joinStrings(parts ...string) []byte {
	n := 0
	for _, s := range parts {
		n += len(s) + 1
	}
	b := make([]byte, 0, n)
	for _, s := range parts {
		b = append(b, s...)
		b = append(b, 0)
	}
	return b
}
