package nbdwire

import (
	"bytes"
	"testing"
)

// Fuzz targets for every decoder: whatever a header decodes to must
// encode back to the same bytes, and nothing may panic. Seeds live in
// testdata/fuzz.

func FuzzParseRequest(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte, ext bool) {
		r, err := ParseRequest(b, ext)
		if err != nil {
			return
		}
		n := RequestHeaderSize(ext)
		out := make([]byte, n)
		if _, err := PutRequest(out, r, ext); err != nil {
			t.Fatalf("decoded %+v does not encode: %v", r, err)
		}
		if !bytes.Equal(out, b[:n]) {
			t.Fatalf("round trip: %x -> %+v -> %x", b[:n], r, out)
		}
	})
}

func FuzzParseReply(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseReply(b)
		if err != nil {
			return
		}
		n := ReplySize(r.Magic)
		out := make([]byte, n)
		switch r.Magic {
		case MagicSimpleReply:
			PutSimpleReply(out, r.Error, r.Cookie)
		case MagicChunkReply:
			PutChunkHeader(out, r.Flags, r.Type, r.Cookie, uint32(r.Length))
		case MagicExtReply:
			PutExtReplyHeader(out, r.Flags, r.Type, r.Cookie, r.Offset, r.Length)
		}
		if !bytes.Equal(out, b[:n]) {
			t.Fatalf("round trip: %x -> %+v -> %x", b[:n], r, out)
		}
	})
}

// FuzzParseHandshake feeds the same bytes to every handshake decoder.
func FuzzParseHandshake(f *testing.F) {
	f.Fuzz(func(t *testing.T, b []byte) {
		if flags, err := ParseGreeting(b); err == nil {
			out := make([]byte, GreetingSize)
			PutGreeting(out, flags)
			if !bytes.Equal(out, b[:GreetingSize]) {
				t.Fatalf("greeting round trip: %x -> %x", b[:GreetingSize], out)
			}
		}
		if opt, n, err := ParseOptionHeader(b); err == nil {
			out := make([]byte, OptionHeaderSize)
			PutOptionHeader(out, opt, n)
			if !bytes.Equal(out, b[:OptionHeaderSize]) {
				t.Fatalf("option round trip: %x -> %x", b[:OptionHeaderSize], out)
			}
		}
		if r, err := ParseOptionReplyHeader(b); err == nil {
			out := make([]byte, OptionReplyHeaderSize)
			PutOptionReplyHeader(out, r)
			if !bytes.Equal(out, b[:OptionReplyHeaderSize]) {
				t.Fatalf("option reply round trip: %x -> %x", b[:OptionReplyHeaderSize], out)
			}
		}
		typ, rest, err := ParseInfo(b)
		if err != nil {
			return
		}
		switch typ {
		case InfoExport:
			size, flags, err := ParseExport(rest)
			out := make([]byte, InfoExportSize)
			PutInfoExport(out, size, flags)
			if err != nil || !bytes.Equal(out, b) {
				t.Fatalf("INFO_EXPORT round trip: %x -> %x (%v)", b, out, err)
			}
		case InfoBlockSize:
			s, err := ParseBlockSize(rest)
			out := make([]byte, InfoBlockSizeSize)
			PutInfoBlockSize(out, s)
			if err != nil || !bytes.Equal(out, b) {
				t.Fatalf("INFO_BLOCK_SIZE round trip: %x -> %x (%v)", b, out, err)
			}
		}
	})
}
