package nbd

import (
	"encoding/binary"
	"fmt"
	"testing"

	"github.com/blktap-go/blktap/internal/nbdwire"
)

// Option haggling (proto.md "Option types", "Option reply types").
func TestOptionHaggling(t *testing.T) {
	be := newMem(1 << 20)
	_, sock, _ := startServer(t, Export{Name: "disk", Description: "d", Backend: be})
	t.Run("errors then GO", func(t *testing.T) {
		haggleErrorsThenGo(t, sock)
	})
	t.Run("EXPORT_NAME with and without zeroes", func(t *testing.T) {
		exportNameZeroes(t, sock)
	})
	t.Run("EXPORT_NAME unknown closes", func(t *testing.T) {
		tc := dial(t, sock)
		tc.greet(nbdwire.ClientFlagFixedNewstyle)
		tc.sendOpt(nbdwire.OptExportName, []byte("nosuch"))
		expectClosed(t, tc)
	})
	t.Run("unknown client flags close", func(t *testing.T) {
		tc := dial(t, sock)
		tc.greet(1 << 7)
		expectClosed(t, tc)
	})
	t.Run("bad option magic closes", func(t *testing.T) {
		tc := dial(t, sock)
		tc.greet(nbdwire.ClientFlagFixedNewstyle)
		tc.c.Write(make([]byte, 16))
		expectClosed(t, tc)
	})
	t.Run("ABORT is acknowledged", func(t *testing.T) {
		tc := dial(t, sock)
		tc.greet(nbdwire.ClientFlagFixedNewstyle)
		if typ, err := tc.simpleOpt(nbdwire.OptAbort); err != nil || typ != nbdwire.RepAck {
			t.Fatalf("ABORT: %#x %v", typ, err)
		}
		expectClosed(t, tc)
	})
	t.Run("LIST_META_CONTEXT", func(t *testing.T) {
		tc := dial(t, sock)
		tc.greet(nbdwire.ClientFlagFixedNewstyle)
		d := binary.BigEndian.AppendUint32(nil, 4)
		d = append(d, "disk"...)
		d = binary.BigEndian.AppendUint32(d, 0)
		tc.sendOpt(nbdwire.OptListMetaContext, d)
		var got []string
		err := tc.untilAck(func(typ uint32, data []byte) error {
			if typ != nbdwire.RepMetaContext || binary.BigEndian.Uint32(data) != 0 {
				return fmt.Errorf("reply %#x % x", typ, data)
			}
			got = append(got, string(data[4:]))
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 2 || got[0] != nameBaseAllocation || got[1] != nameAllocDepth {
			t.Fatalf("contexts %q", got)
		}
	})
}

// haggleErrorsThenGo: each option the server refuses gets its own error
// reply, the stream stays in frame, and GO then succeeds.
func haggleErrorsThenGo(t *testing.T, sock string) {
	tc := dial(t, sock)
	if err := tc.greet(nbdwire.ClientFlagFixedNewstyle); err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		opt  uint32
		data []byte
		want uint32
	}{
		{99, []byte("junk"), nbdwire.RepErrUnsupported},
		{nbdwire.OptStartTLS, nil, nbdwire.RepErrPolicy},
		{nbdwire.OptList, []byte("x"), nbdwire.RepErrInvalid},
		{nbdwire.OptStructuredReply, []byte("x"), nbdwire.RepErrInvalid},
		{nbdwire.OptInfo, infoData("nosuch"), nbdwire.RepErrUnknown},
		{nbdwire.OptGo, infoData("nosuch"), nbdwire.RepErrUnknown},
		{nbdwire.OptGo, []byte{0, 0, 0, 9, 'a'}, nbdwire.RepErrInvalid},
		{nbdwire.OptInfo, append(infoData("disk"), 0), nbdwire.RepErrInvalid},
		{nbdwire.OptSetMetaContext, nil, nbdwire.RepErrInvalid}, // before STRUCTURED_REPLY
		{nbdwire.OptInfo, infoData("disk", nbdwire.InfoName, nbdwire.InfoDescription), nbdwire.RepAck},
		{nbdwire.OptStructuredReply, nil, nbdwire.RepAck},
		{nbdwire.OptStructuredReply, nil, nbdwire.RepErrInvalid}, // twice
	}
	for _, st := range steps {
		if err := tc.sendOpt(st.opt, st.data); err != nil {
			t.Fatal(err)
		}
		for {
			opt, typ, data, err := tc.optReply()
			if err != nil {
				t.Fatal(err)
			}
			if opt != st.opt {
				t.Fatalf("reply for option %d, want %d", opt, st.opt)
			}
			if typ == nbdwire.RepInfo {
				continue
			}
			if typ != st.want {
				t.Fatalf("option %d: reply %#x %q, want %#x", st.opt, typ, data, st.want)
			}
			break
		}
	}
	// A too-long option is skipped and refused; the stream stays in frame.
	tc.sendOpt(nbdwire.OptInfo, make([]byte, maxOptionLen+1))
	if _, typ, _, err := tc.optReply(); err != nil || typ != nbdwire.RepErrTooBig {
		t.Fatalf("long option: %#x %v", typ, err)
	}
	tc.sendOpt(nbdwire.OptGo, infoData("disk"))
	if err := tc.untilAck(nil); err != nil {
		t.Fatal(err)
	}
	tc.structured = true
	mustOK(t)(tc.do(Request{Type: nbdwire.CmdFlush, Cookie: 5}, nil))
}

// exportNameZeroes: EXPORT_NAME answers with the 124 zero bytes unless
// the client set NO_ZEROES.
func exportNameZeroes(t *testing.T, sock string) {
	for _, noZeroes := range []bool{true, false} {
		tc := dial(t, sock)
		fl := uint32(nbdwire.ClientFlagFixedNewstyle)
		if noZeroes {
			fl |= nbdwire.ClientFlagNoZeroes
		}
		tc.greet(fl)
		tc.sendOpt(nbdwire.OptExportName, []byte("disk"))
		n := 10
		if !noZeroes {
			n = 134
		}
		b, err := tc.readN(n)
		if err != nil {
			t.Fatal(err)
		}
		if binary.BigEndian.Uint64(b) != 1<<20 {
			t.Fatalf("size %d", binary.BigEndian.Uint64(b))
		}
		mustOK(t)(tc.do(Request{Type: nbdwire.CmdFlush, Cookie: 5}, nil))
	}
}
