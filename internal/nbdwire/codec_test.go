package nbdwire

import (
	"bytes"
	"encoding/hex"
	"errors"
	"testing"
)

// Golden encodings, built by hand from proto.md's tables (not by the
// code under test), so a wrong offset or magic fails here.
func TestRequestGolden(t *testing.T) {
	r := Request{Flags: CmdFlagFUA, Type: CmdWrite, Cookie: 0x0102030405060708, Offset: 0x1000, Length: 0x200}
	compact := "25609513" + "0001" + "0001" + "0102030405060708" + "0000000000001000" + "00000200"
	ext := "21e41c71" + "0001" + "0001" + "0102030405060708" + "0000000000001000" + "0000000000000200"
	for _, c := range []struct {
		ext  bool
		want string
	}{{false, compact}, {true, ext}} {
		b, err := AppendRequest(nil, r, c.ext)
		if err != nil || hex.EncodeToString(b) != c.want {
			t.Errorf("ext=%v: got %x, %v; want %s", c.ext, b, err, c.want)
		}
		got, err := ParseRequest(b, c.ext)
		if err != nil || got != r {
			t.Errorf("ext=%v: parsed %+v, %v", c.ext, got, err)
		}
	}
}

func TestRequestErrors(t *testing.T) {
	if _, err := AppendRequest(nil, Request{Length: 1 << 32}, false); !errors.Is(err, ErrTooLong) {
		t.Errorf("compact 4 GiB request: %v, want ErrTooLong", err)
	}
	if _, err := ParseRequest(make([]byte, 27), false); !errors.Is(err, ErrShort) {
		t.Errorf("27 bytes: %v, want ErrShort", err)
	}
	b, _ := AppendRequest(nil, Request{}, false)
	if _, err := ParseRequest(b, true); !errors.Is(err, ErrShort) {
		t.Errorf("compact header read as extended: %v, want ErrShort", err)
	}
	b = append(b, 0, 0, 0, 0)
	if _, err := ParseRequest(b, true); !errors.Is(err, ErrBadMagic) {
		t.Errorf("compact magic read as extended: %v, want ErrBadMagic", err)
	}
}

func TestReplyGolden(t *testing.T) {
	cases := []struct {
		name string
		put  func([]byte)
		want string
		r    Reply
	}{
		{"simple", func(b []byte) { PutSimpleReply(b, ErrnoNoSpace, 9) },
			"67446698" + "0000001c" + "0000000000000009",
			Reply{Magic: MagicSimpleReply, Error: 28, Cookie: 9}},
		{"chunk", func(b []byte) { PutChunkHeader(b, ChunkFlagDone, ChunkOffsetData, 9, 4104) },
			"668e33ef" + "0001" + "0001" + "0000000000000009" + "00001008",
			Reply{Magic: MagicChunkReply, Flags: 1, Type: 1, Cookie: 9, Length: 4104}},
		{"extended", func(b []byte) { PutExtReplyHeader(b, ChunkFlagDone, ChunkError, 9, 512, 6) },
			"6e8a278c" + "0001" + "8001" + "0000000000000009" + "0000000000000200" + "0000000000000006",
			Reply{Magic: MagicExtReply, Flags: 1, Type: 0x8001, Cookie: 9, Offset: 512, Length: 6}},
	}
	for _, c := range cases {
		b := make([]byte, len(c.want)/2)
		c.put(b)
		if hex.EncodeToString(b) != c.want {
			t.Errorf("%s: put %x, want %s", c.name, b, c.want)
		}
		r, err := ParseReply(b)
		if err != nil || r != c.r {
			t.Errorf("%s: parsed %+v, %v; want %+v", c.name, r, err, c.r)
		}
		if _, err := ParseReply(b[:len(b)-1]); !errors.Is(err, ErrShort) {
			t.Errorf("%s: truncated: %v, want ErrShort", c.name, err)
		}
	}
	if _, err := ParseReply([]byte{0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0}); !errors.Is(err, ErrBadMagic) {
		t.Errorf("request magic as a reply: %v, want ErrBadMagic", err)
	}
}

func TestHandshakeGolden(t *testing.T) {
	g := make([]byte, GreetingSize)
	PutGreeting(g, FlagFixedNewstyle|FlagNoZeroes)
	if want := "4e42444d41474943" + "49484156454f5054" + "0003"; hex.EncodeToString(g) != want {
		t.Errorf("greeting %x, want %s", g, want)
	}
	if f, err := ParseGreeting(g); err != nil || f != 3 {
		t.Errorf("ParseGreeting: %d, %v", f, err)
	}
	old, _ := hex.DecodeString("4e42444d41474943" + "0000420281861253" + "0000")
	if _, err := ParseGreeting(old); !errors.Is(err, ErrOldstyle) {
		t.Errorf("oldstyle greeting: %v", err)
	}
	o := AppendOption(nil, OptGo, []byte{1, 2})
	if want := "49484156454f5054" + "00000007" + "00000002" + "0102"; hex.EncodeToString(o) != want {
		t.Errorf("option %x, want %s", o, want)
	}
	if opt, n, err := ParseOptionHeader(o); opt != OptGo || n != 2 || err != nil {
		t.Errorf("ParseOptionHeader: %d %d %v", opt, n, err)
	}
	rh := make([]byte, OptionReplyHeaderSize)
	PutOptionReplyHeader(rh, OptionReply{Option: OptGo, Type: RepErrUnknown, Length: 5})
	if want := "0003e889045565a9" + "00000007" + "80000006" + "00000005"; hex.EncodeToString(rh) != want {
		t.Errorf("option reply %x, want %s", rh, want)
	}
	info := make([]byte, InfoExportSize)
	PutInfoExport(info, 1<<30, TransHasFlags|TransReadOnly)
	typ, rest, err := ParseInfo(info)
	size, flags, err2 := ParseExport(rest)
	if typ != InfoExport || err != nil || err2 != nil || size != 1<<30 || flags != 3 {
		t.Errorf("INFO_EXPORT: %d %d %d %v %v", typ, size, flags, err, err2)
	}
	if _, _, err := ParseInfo(info[:11]); err == nil {
		t.Error("an 11-byte INFO_EXPORT parsed")
	}
	bs := make([]byte, InfoBlockSizeSize)
	PutInfoBlockSize(bs, BlockSize{1, 4096, 32 << 20})
	if want := "0003" + "00000001" + "00001000" + "02000000"; hex.EncodeToString(bs) != want {
		t.Errorf("INFO_BLOCK_SIZE %x, want %s", bs, want)
	}
	if _, rest, _ := ParseInfo(bs); !bytes.Equal(rest, bs[2:]) {
		t.Error("ParseInfo lost BLOCK_SIZE's payload")
	} else if s, err := ParseBlockSize(rest); err != nil || s != (BlockSize{1, 4096, 32 << 20}) {
		t.Errorf("ParseBlockSize: %+v %v", s, err)
	}
}

func TestQueryGolden(t *testing.T) {
	q := AppendMetaContextQuery([]byte{9}, "ab", "c", "")
	if want := "09" + "00000002" + "6162" + "00000002" + "00000001" + "63" + "00000000"; hex.EncodeToString(q) != want {
		t.Errorf("query %x, want %s", q, want)
	}
	if q := AppendMetaContextQuery(nil, ""); hex.EncodeToString(q) != "0000000000000000" {
		t.Errorf("empty query %x", q)
	}
	g := AppendInfoQuery([]byte{9}, "ab", InfoBlockSize, InfoExport)
	if want := "09" + "00000002" + "6162" + "0002" + "0003" + "0000"; hex.EncodeToString(g) != want {
		t.Errorf("info query %x, want %s", g, want)
	}
}

func TestCmdName(t *testing.T) {
	if CmdName(CmdBlockStatus) != "BLOCK_STATUS" || CmdName(99) != "CMD_99" {
		t.Errorf("CmdName: %q %q", CmdName(CmdBlockStatus), CmdName(99))
	}
}

// The hot path must not allocate: these run once per request and reply.
func TestNoAllocations(t *testing.T) {
	b := make([]byte, ExtRequestSize)
	n := testing.AllocsPerRun(100, func() {
		_, _ = PutRequest(b, Request{Type: CmdRead, Length: 4096}, true)
		_, _ = ParseRequest(b, true)
		PutExtReplyHeader(b, 0, 0, 1, 2, 3)
		_, _ = ParseReply(b)
		PutSimpleReply(b, 0, 1)
		PutChunkHeader(b, 0, 0, 1, 2)
	})
	if n != 0 {
		t.Errorf("%v allocations per round", n)
	}
}
