package xenstore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"syscall"
	"testing"

	"github.com/blktap-go/blktap/internal/corpus"
)

func TestMessageAppendLayout(t *testing.T) {
	// xs_wire.h struct xsd_sockmsg: type, req_id, tx_id, len, all u32.
	m := Message{Type: OpWrite, ReqID: 0x01020304, TxID: 7, Payload: []byte("/a\x00b")}
	b, err := m.Append(nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []byte{11, 0, 0, 0, 4, 3, 2, 1, 7, 0, 0, 0, 4, 0, 0, 0, '/', 'a', 0, 'b'}
	if !bytes.Equal(b, want) {
		t.Fatalf("got % x\nwant % x", b, want)
	}
}

func TestMessageAppendRejectsBig(t *testing.T) {
	m := Message{Type: OpWrite, Payload: make([]byte, PayloadMax+1)}
	if _, err := m.Append(nil); !errors.Is(err, ErrPayloadTooBig) {
		t.Fatalf("err = %v", err)
	}
	m.Payload = m.Payload[:PayloadMax]
	if _, err := m.Append(nil); err != nil {
		t.Fatalf("4096 bytes must encode: %v", err)
	}
}

func TestDecoderByteByByte(t *testing.T) {
	var stream []byte
	msgs := []Message{
		{Type: OpRead, ReqID: 1, Payload: []byte("/x\x00")},
		{Type: OpWatchEvent, Payload: []byte("/x\x00tok\x00")},
		{Type: OpTransactionStart, ReqID: 3, Payload: []byte{}},
		{Type: OpWrite, ReqID: 4, TxID: 9, Payload: bytes.Repeat([]byte("v"), PayloadMax)},
	}
	for _, m := range msgs {
		stream, _ = m.Append(stream)
	}
	var d Decoder
	var got []Message
	for i := range stream {
		d.Feed(stream[i : i+1])
		for {
			m, ok, err := d.Next()
			if err != nil {
				t.Fatal(err)
			}
			if !ok {
				break
			}
			got = append(got, m)
		}
	}
	if len(got) != len(msgs) {
		t.Fatalf("got %d messages, want %d", len(got), len(msgs))
	}
	for i := range msgs {
		if got[i].Type != msgs[i].Type || got[i].ReqID != msgs[i].ReqID || got[i].TxID != msgs[i].TxID || !bytes.Equal(got[i].Payload, msgs[i].Payload) {
			t.Errorf("message %d: got %v want %v", i, got[i], msgs[i])
		}
	}
	if d.Buffered() != 0 {
		t.Errorf("%d bytes left over", d.Buffered())
	}
}

func TestDecoderOversizeIsSticky(t *testing.T) {
	var h [HeaderSize]byte
	binary.LittleEndian.PutUint32(h[12:], PayloadMax+1)
	var d Decoder
	d.Feed(h[:])
	for i := 0; i < 2; i++ {
		if _, ok, err := d.Next(); ok || !errors.Is(err, ErrPayloadTooBig) {
			t.Fatalf("call %d: ok=%v err=%v", i, ok, err)
		}
	}
}

func TestErrorClasses(t *testing.T) {
	e := parseErrorPayload([]byte("ENOENT\x00"))
	if !errors.Is(e, ErrNotFound) || !errors.Is(e, syscall.ENOENT) || errors.Is(e, ErrExists) {
		t.Fatalf("ENOENT classes wrong: %v", e)
	}
	// A distinct value with the same name matches too.
	if !errors.Is(&Error{Name: "EAGAIN"}, ErrAgain) {
		t.Fatal("EAGAIN by name")
	}
	if u := parseErrorPayload([]byte("EWHATEVER\x00")); u.Name != "EWHATEVER" || errors.Is(u, ErrInvalid) {
		t.Fatalf("unknown name: %#v", u)
	}
	if e := parseErrorPayload(nil); !errors.Is(e, ErrInvalid) {
		t.Fatalf("empty payload: %v", e)
	}
}

func TestPerms(t *testing.T) {
	for _, c := range []struct {
		in   string
		want Perm
		bad  bool
	}{
		{in: "r5", want: Perm{5, PermRead}},
		{in: "b0", want: Perm{0, PermBoth}},
		{in: "n4294967295", want: Perm{4294967295, PermNone}},
		{in: "w12", want: Perm{12, PermWrite}},
		{in: "w", bad: true},
		{in: "", bad: true},
		{in: "x1", bad: true},
		{in: "r-1", bad: true},
		{in: "r+1", bad: true},
		{in: "r4294967296", bad: true},
	} {
		got, err := ParsePerm(c.in)
		if c.bad {
			if err == nil || !errors.Is(err, ErrInvalid) {
				t.Errorf("%q: want EINVAL, got %v %v", c.in, got, err)
			}
			continue
		}
		if err != nil || got != c.want || got.String() != c.in {
			t.Errorf("%q: got %v (%q) %v", c.in, got, got.String(), err)
		}
	}
	perms := []Perm{{3, PermRead}, {5, PermWrite}, {0, PermNone}}
	for _, c := range []struct {
		dom  uint32
		want Access
	}{{3, PermBoth}, {5, PermWrite}, {0, PermNone}, {9, PermRead}} {
		if got := accessFor(perms, c.dom); got != c.want {
			t.Errorf("dom %d: %c want %c", c.dom, got, c.want)
		}
	}
}

func TestCanonicalPath(t *testing.T) {
	long := "/" + string(bytes.Repeat([]byte("a"), RelPathMax-1))
	rel := string(bytes.Repeat([]byte("r"), RelPathMax))
	for _, c := range []struct {
		in      string
		dom     uint32
		special bool
		want    string // "" = EINVAL
	}{
		{in: "/", want: "/"},
		{in: "/a/b-c_d@e", want: "/a/b-c_d@e"},
		{in: "device/vbd", dom: 3, want: "/local/domain/3/device/vbd"},
		{in: "@releaseDomain", special: true, want: "@releaseDomain"},
		{in: "@anything", special: true, want: "@anything"},
		{in: "@releaseDomain"},
		{in: ""},
		{in: "/a/"},
		{in: "/a//b"},
		{in: "/a b"},
		{in: "/a.b"},
		{in: long, want: long},
		{in: long + "a"},
		{in: "/local/domain/7/" + long[1:] + "a", want: "/local/domain/7/" + long[1:] + "a"},
		{in: "/local/domain/7/" + long[1:] + "aa"},
		{in: rel, dom: 2, want: "/local/domain/2/" + rel},
		{in: rel + "r", dom: 2},
	} {
		got, err := CanonicalPath(c.dom, c.in, c.special)
		if c.want == "" {
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("%q: want EINVAL, got %q %v", c.in, got, err)
			}
		} else if err != nil || got != c.want {
			t.Errorf("%.40q: got %.40q %v", c.in, got, err)
		}
	}
}

// FuzzDecoder: no input panics; every accepted message re-encodes to the
// bytes it came from.
func FuzzDecoder(f *testing.F) {
	for _, b := range corpus.Files(f, "wire/*.bin") {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		var d Decoder
		d.Feed(in)
		consumed := 0
		for {
			m, ok, err := d.Next()
			if err != nil {
				if !errors.Is(err, ErrPayloadTooBig) {
					t.Fatalf("unexpected error class %v", err)
				}
				return
			}
			if !ok {
				break
			}
			b, err := m.Append(nil)
			if err != nil {
				t.Fatalf("accepted message does not encode: %v", err)
			}
			if !bytes.Equal(b, in[consumed:consumed+len(b)]) {
				t.Fatalf("round trip differs")
			}
			consumed += len(b)
		}
		if consumed+d.Buffered() != len(in) {
			t.Fatalf("lost bytes: %d + %d != %d", consumed, d.Buffered(), len(in))
		}
	})
}
