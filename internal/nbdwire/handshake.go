package nbdwire

import "fmt"

// PutGreeting writes the server's fixed-newstyle greeting into
// b[:GreetingSize].
func PutGreeting(b []byte, flags uint16) {
	_ = b[GreetingSize-1]
	be.PutUint64(b, MagicNBD)
	be.PutUint64(b[8:], MagicOption)
	be.PutUint16(b[16:], flags)
}

// ParseGreeting decodes a server's greeting and returns its handshake
// flags. Errors wrap ErrShort, ErrBadMagic (not an NBD server, or a
// greeting out of frame) or ErrOldstyle.
func ParseGreeting(b []byte) (flags uint16, err error) {
	if len(b) < GreetingSize {
		return 0, short("greeting", GreetingSize, len(b))
	}
	if m := be.Uint64(b); m != MagicNBD {
		return 0, fmt.Errorf("%w: greeting %q is not NBDMAGIC", ErrBadMagic, b[:8])
	}
	switch m := be.Uint64(b[8:]); m {
	case MagicOption:
		return be.Uint16(b[16:]), nil
	case MagicOldstyle:
		return 0, ErrOldstyle
	default:
		return 0, fmt.Errorf("%w %#x after NBDMAGIC", ErrBadMagic, m)
	}
}

// PutOptionHeader writes an option's header into b[:OptionHeaderSize];
// length bytes of data follow it.
func PutOptionHeader(b []byte, option, length uint32) {
	_ = b[OptionHeaderSize-1]
	be.PutUint64(b, MagicOption)
	be.PutUint32(b[8:], option)
	be.PutUint32(b[12:], length)
}

// AppendOption appends an option with its data to b.
func AppendOption(b []byte, option uint32, data []byte) []byte {
	var h [OptionHeaderSize]byte
	PutOptionHeader(h[:], option, uint32(len(data)))
	return append(append(b, h[:]...), data...)
}

// ParseOptionHeader decodes an option's header. Errors wrap ErrShort or
// ErrBadMagic.
func ParseOptionHeader(b []byte) (option, length uint32, err error) {
	if len(b) < OptionHeaderSize {
		return 0, 0, short("option header", OptionHeaderSize, len(b))
	}
	if m := be.Uint64(b); m != MagicOption {
		return 0, 0, fmt.Errorf("%w %#x in an option header", ErrBadMagic, m)
	}
	return be.Uint32(b[8:]), be.Uint32(b[12:]), nil
}

// OptionReply is an option reply's header; Length bytes of data follow.
type OptionReply struct {
	Option uint32
	Type   uint32
	Length uint32
}

// PutOptionReplyHeader writes an option reply's header into
// b[:OptionReplyHeaderSize].
func PutOptionReplyHeader(b []byte, r OptionReply) {
	_ = b[OptionReplyHeaderSize-1]
	be.PutUint64(b, MagicOptionReply)
	be.PutUint32(b[8:], r.Option)
	be.PutUint32(b[12:], r.Type)
	be.PutUint32(b[16:], r.Length)
}

// ParseOptionReplyHeader decodes an option reply's header. Errors wrap
// ErrShort or ErrBadMagic.
func ParseOptionReplyHeader(b []byte) (OptionReply, error) {
	if len(b) < OptionReplyHeaderSize {
		return OptionReply{}, short("option reply header", OptionReplyHeaderSize, len(b))
	}
	if m := be.Uint64(b); m != MagicOptionReply {
		return OptionReply{}, fmt.Errorf("%w %#x in an option reply header", ErrBadMagic, m)
	}
	return OptionReply{Option: be.Uint32(b[8:]), Type: be.Uint32(b[12:]), Length: be.Uint32(b[16:])}, nil
}

// PutInfoExport writes NBD_INFO_EXPORT's payload into b[:InfoExportSize].
// NBD_OPT_EXPORT_NAME's answer is the same minus the leading type:
// PutInfoExport(b, ...) then send b[2:].
func PutInfoExport(b []byte, size uint64, flags uint16) {
	_ = b[InfoExportSize-1]
	be.PutUint16(b, InfoExport)
	be.PutUint64(b[2:], size)
	be.PutUint16(b[10:], flags)
}

// ParseExport decodes an export's size and transmission flags from the
// 10 bytes at the start of b: NBD_INFO_EXPORT's payload after its type,
// or NBD_OPT_EXPORT_NAME's answer.
func ParseExport(b []byte) (size uint64, flags uint16, err error) {
	if len(b) < ExportNameReplySize {
		return 0, 0, short("export size and flags", ExportNameReplySize, len(b))
	}
	return be.Uint64(b), be.Uint16(b[8:]), nil
}

// BlockSize is NBD_INFO_BLOCK_SIZE's payload.
type BlockSize struct {
	Minimum, Preferred, MaxPayload uint32
}

// PutInfoBlockSize writes NBD_INFO_BLOCK_SIZE's payload into
// b[:InfoBlockSizeSize].
func PutInfoBlockSize(b []byte, s BlockSize) {
	_ = b[InfoBlockSizeSize-1]
	be.PutUint16(b, InfoBlockSize)
	be.PutUint32(b[2:], s.Minimum)
	be.PutUint32(b[6:], s.Preferred)
	be.PutUint32(b[10:], s.MaxPayload)
}

// ParseInfo splits an NBD_REP_INFO payload into its type and the rest.
// For the fixed-size types (EXPORT, BLOCK_SIZE) a payload of another
// length is an error; the variable ones (NAME, DESCRIPTION) and unknown
// types come back as they are.
func ParseInfo(b []byte) (typ uint16, rest []byte, err error) {
	if len(b) < 2 {
		return 0, nil, short("NBD_REP_INFO", 2, len(b))
	}
	typ = be.Uint16(b)
	want := 0
	switch typ {
	case InfoExport:
		want = InfoExportSize
	case InfoBlockSize:
		want = InfoBlockSizeSize
	}
	if want != 0 && len(b) != want {
		return typ, nil, fmt.Errorf("NBD_INFO type %d of %d bytes, want %d", typ, len(b), want)
	}
	return typ, b[2:], nil
}

// ParseBlockSize decodes NBD_INFO_BLOCK_SIZE's payload after its type.
func ParseBlockSize(b []byte) (BlockSize, error) {
	if len(b) < InfoBlockSizeSize-2 {
		return BlockSize{}, short("NBD_INFO_BLOCK_SIZE", InfoBlockSizeSize-2, len(b))
	}
	return BlockSize{be.Uint32(b), be.Uint32(b[4:]), be.Uint32(b[8:])}, nil
}

// AppendMetaContextQuery appends the data of a LIST_META_CONTEXT or
// SET_META_CONTEXT option to b: the export name and the queries, each a
// 32-bit length and its bytes, the queries after their 32-bit count.
func AppendMetaContextQuery(b []byte, export string, queries ...string) []byte {
	b = be.AppendUint32(b, uint32(len(export)))
	b = append(b, export...)
	b = be.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = be.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// AppendInfoQuery appends the data of an INFO or GO option to b: the
// export name (32-bit length, bytes) and the information requests after
// their 16-bit count.
func AppendInfoQuery(b []byte, export string, infos ...uint16) []byte {
	b = be.AppendUint32(b, uint32(len(export)))
	b = append(b, export...)
	b = be.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = be.AppendUint16(b, i)
	}
	return b
}
