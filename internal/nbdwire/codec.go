package nbdwire

import (
	"encoding/binary"
	"errors"
	"fmt"
)

var (
	// ErrShort means the buffer given to a Parse function is shorter
	// than the header it decodes.
	ErrShort = errors.New("nbd: header truncated")
	// ErrBadMagic means a header did not start with the magic it must:
	// the stream is out of frame.
	ErrBadMagic = errors.New("nbd: bad magic")
	// ErrOldstyle means the server greeted with the obsolete oldstyle
	// negotiation, which nobody here speaks.
	ErrOldstyle = errors.New("nbd: oldstyle negotiation")
	// ErrTooLong means a compact request cannot carry the length asked.
	ErrTooLong = errors.New("nbd: length needs extended headers")
)

var be = binary.BigEndian

func short(what string, need, have int) error {
	return fmt.Errorf("%w: %s needs %d bytes, have %d", ErrShort, what, need, have)
}

// Request is one transmission-phase request. Length is 64-bit because
// extended headers carry a 64-bit length.
type Request struct {
	Flags  uint16
	Type   uint16
	Cookie uint64
	Offset uint64
	Length uint64
}

// RequestHeaderSize is the size of a request header: compact, or
// extended when ext.
func RequestHeaderSize(ext bool) int {
	if ext {
		return ExtRequestSize
	}
	return RequestSize
}

// ParseRequest decodes a request header from the start of b. Errors wrap
// ErrShort or ErrBadMagic.
func ParseRequest(b []byte, ext bool) (Request, error) {
	// The checks are one comparison each here and the error is built
	// out of line: this runs once per request.
	if ext {
		if len(b) < ExtRequestSize || be.Uint32(b) != MagicExtRequest {
			return Request{}, requestError(b, ext)
		}
		return Request{Flags: be.Uint16(b[4:]), Type: be.Uint16(b[6:]), Cookie: be.Uint64(b[8:]),
			Offset: be.Uint64(b[16:]), Length: be.Uint64(b[24:])}, nil
	}
	if len(b) < RequestSize || be.Uint32(b) != MagicRequest {
		return Request{}, requestError(b, ext)
	}
	return Request{Flags: be.Uint16(b[4:]), Type: be.Uint16(b[6:]), Cookie: be.Uint64(b[8:]),
		Offset: be.Uint64(b[16:]), Length: uint64(be.Uint32(b[24:]))}, nil
}

// requestError says what is wrong with a header ParseRequest refused.
func requestError(b []byte, ext bool) error {
	if n := RequestHeaderSize(ext); len(b) < n {
		return short("request header", n, len(b))
	}
	return fmt.Errorf("%w %#x in a request header", ErrBadMagic, be.Uint32(b))
}

// PutRequest encodes r into b, which must hold RequestHeaderSize(ext)
// bytes, and returns that size. A compact header cannot carry a Length
// above 2^32-1: that is ErrTooLong, and b is left alone.
func PutRequest(b []byte, r Request, ext bool) (int, error) {
	if !ext && r.Length > 0xffffffff {
		return 0, fmt.Errorf("%w: %d bytes", ErrTooLong, r.Length)
	}
	n := RequestHeaderSize(ext)
	_ = b[n-1]
	if ext {
		be.PutUint32(b, MagicExtRequest)
		be.PutUint64(b[24:], r.Length)
	} else {
		be.PutUint32(b, MagicRequest)
		be.PutUint32(b[24:], uint32(r.Length))
	}
	be.PutUint16(b[4:], r.Flags)
	be.PutUint16(b[6:], r.Type)
	be.PutUint64(b[8:], r.Cookie)
	be.PutUint64(b[16:], r.Offset)
	return n, nil
}

// AppendRequest appends r's header to b.
func AppendRequest(b []byte, r Request, ext bool) ([]byte, error) {
	var h [ExtRequestSize]byte
	n, err := PutRequest(h[:], r, ext)
	return append(b, h[:n]...), err
}

// Reply is a decoded reply header of any of the three kinds. Error is
// set only in simple replies; Flags, Type and Length only in chunks and
// extended replies; Offset only in extended replies.
type Reply struct {
	Magic  uint32 // which kind: MagicSimpleReply, MagicChunkReply, MagicExtReply
	Flags  uint16
	Type   uint16
	Error  uint32
	Cookie uint64
	Offset uint64
	Length uint64 // the payload's length (a simple reply's is not in its header)
}

// ReplySize is the size of the reply header that starts with magic, or 0
// for a magic that starts none.
func ReplySize(magic uint32) int {
	switch magic {
	case MagicSimpleReply:
		return SimpleReplySize
	case MagicChunkReply:
		return ChunkHeaderSize
	case MagicExtReply:
		return ExtReplyHeaderSize
	}
	return 0
}

// ParseReply decodes the reply header at the start of b, whatever its
// kind. Errors wrap ErrShort or ErrBadMagic.
func ParseReply(b []byte) (Reply, error) {
	var r Reply
	if len(b) < 4 {
		return r, short("reply header", 4, len(b))
	}
	r.Magic = be.Uint32(b)
	n := ReplySize(r.Magic)
	if n == 0 {
		return r, fmt.Errorf("%w %#x in a reply header", ErrBadMagic, r.Magic)
	}
	if len(b) < n {
		return r, short("reply header", n, len(b))
	}
	r.Cookie = be.Uint64(b[8:])
	switch r.Magic {
	case MagicSimpleReply:
		r.Error = be.Uint32(b[4:])
		return r, nil
	case MagicChunkReply:
		r.Length = uint64(be.Uint32(b[16:]))
	case MagicExtReply:
		r.Offset = be.Uint64(b[16:])
		r.Length = be.Uint64(b[24:])
	}
	r.Flags = be.Uint16(b[4:])
	r.Type = be.Uint16(b[6:])
	return r, nil
}

// PutSimpleReply writes a simple reply header into b[:SimpleReplySize].
func PutSimpleReply(b []byte, errno uint32, cookie uint64) {
	_ = b[SimpleReplySize-1]
	be.PutUint32(b, MagicSimpleReply)
	be.PutUint32(b[4:], errno)
	be.PutUint64(b[8:], cookie)
}

// PutChunkHeader writes a structured reply chunk header into
// b[:ChunkHeaderSize].
func PutChunkHeader(b []byte, flags, typ uint16, cookie uint64, length uint32) {
	_ = b[ChunkHeaderSize-1]
	be.PutUint32(b, MagicChunkReply)
	be.PutUint16(b[4:], flags)
	be.PutUint16(b[6:], typ)
	be.PutUint64(b[8:], cookie)
	be.PutUint32(b[16:], length)
}

// PutExtReplyHeader writes an extended reply header into
// b[:ExtReplyHeaderSize]; offset echoes the request's.
func PutExtReplyHeader(b []byte, flags, typ uint16, cookie, offset, length uint64) {
	_ = b[ExtReplyHeaderSize-1]
	be.PutUint32(b, MagicExtReply)
	be.PutUint16(b[4:], flags)
	be.PutUint16(b[6:], typ)
	be.PutUint64(b[8:], cookie)
	be.PutUint64(b[16:], offset)
	be.PutUint64(b[24:], length)
}
