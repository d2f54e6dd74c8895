package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/nbdwire"
)

// Fuzz targets for every parser of peer bytes: the request header codec,
// option haggling, and a whole connection (handshake and transmission).
// Seeds live in testdata/fuzz/<target>/; regenerate them with
// go test -run TestWriteSeeds -write-seeds.

var writeSeeds = flag.Bool("write-seeds", false, "rewrite testdata/fuzz seed corpora")

func FuzzParseRequest(f *testing.F) {
	for _, ext := range []bool{false, true} {
		b, _ := nbdwire.AppendRequest(nil, Request{Flags: nbdwire.CmdFlagFUA, Type: nbdwire.CmdWrite, Cookie: 7, Offset: 4096, Length: 512}, ext)
		f.Add(b, ext)
	}
	f.Add([]byte("garbage that is long enough to be a header"), false)
	f.Fuzz(func(t *testing.T, b []byte, ext bool) {
		r, err := ParseRequest(b, ext)
		if err != nil {
			return
		}
		// Accepted headers round-trip byte for byte.
		out, err := nbdwire.AppendRequest(nil, r, ext)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out, b[:len(out)]) {
			t.Fatalf("round trip\n got % x\nwant % x", out, b[:len(out)])
		}
	})
}

// fuzzNegotiator negotiates each seed, and what the fuzzer makes of
// them, with a server on a 1 MiB disk, and hands the outcome to check.
// prepare sets the negotiator up (TLS, say) before it runs.
func fuzzNegotiator(f *testing.F, seeds []seedConv, prepare func(*negotiator), check func(*testing.T, *negotiator, *session, error)) {
	for _, s := range seeds {
		f.Add(s.data)
	}
	s := &Server{Export: Export{Name: "disk", Backend: newMem(1 << 20)}}
	f.Fuzz(func(t *testing.T, data []byte) {
		n := &negotiator{s: s, r: bytes.NewReader(data), w: bufio.NewWriter(io.Discard)}
		prepare(n)
		sess, err := n.negotiate()
		check(t, n, sess, err)
	})
}

func FuzzNegotiate(f *testing.F) {
	fuzzNegotiator(f, seedConversations(), func(*negotiator) {}, func(t *testing.T, _ *negotiator, sess *session, err error) {
		if err == nil && sess.tflags&nbdwire.TransHasFlags == 0 {
			t.Fatalf("negotiated session without HAS_FLAGS: %+v", sess)
		}
		if err == nil && sess.extended && !sess.structured {
			t.Fatal("extended headers without structured replies")
		}
	})
}

// FuzzNegotiateTLS drives a TLS-only server's haggling. The TLS layer
// itself is Go's; here STARTTLS "upgrades" to the same plain stream, so
// the fuzzer reaches the options before and after it.
func FuzzNegotiateTLS(f *testing.F) {
	upgrades := 0
	prepare := func(n *negotiator) {
		n.tlsRequired = true
		upgrades = 0
		n.startTLS = func() error { upgrades++; return nil }
	}
	fuzzNegotiator(f, seedTLSConversations(), prepare, func(t *testing.T, n *negotiator, sess *session, err error) {
		if upgrades > 1 {
			t.Fatalf("TLS started %d times", upgrades)
		}
		if err == nil && !n.tlsDone {
			t.Fatalf("reached transmission without TLS: %+v", sess)
		}
	})
}

func FuzzServeConn(f *testing.F) {
	for _, s := range seedConversations() {
		f.Add(s.data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		be := layered{newMem(1 << 20)}
		s := &Server{Export: Export{Name: "disk", Backend: be}, HandshakeTimeout: 5 * time.Second, MaxInFlight: 4}
		serveBytes(t, s, data)
	})
}

// serveBytes plays data to s as a client that then hangs up, and fails
// the test if the server does not finish soon after.
func serveBytes(t *testing.T, s *Server, data []byte) {
	a, b := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- s.ServeConn(context.Background(), a) }()
	go io.Copy(io.Discard, b)
	b.SetWriteDeadline(time.Now().Add(5 * time.Second))
	b.Write(data)
	b.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("server did not finish after the client hung up")
	}
}

// FuzzServeConnStarter is FuzzServeConn against the paths a guest view
// and a worker take: requests started on a Starter (RoundTrip) in the
// Lender's buffers or copied, completed on its goroutine, and writes run
// on the reader.
func FuzzServeConnStarter(f *testing.F) {
	for _, s := range seedConversations() {
		f.Add(s.data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		be := newLender(1<<20, 4096, 8, 1<<19)
		defer close(be.queue)
		s := &Server{Export: Export{Name: "disk", Backend: be, RoundTrip: true, InlineWrites: true},
			HandshakeTimeout: 5 * time.Second, MaxInFlight: 4}
		serveBytes(t, s, data)
	})
}

type seedConv struct {
	name string
	data []byte
}

// seedConversations are client byte streams: well-formed ones that reach
// every option and command, and broken ones named for their fault.
func seedConversations() []seedConv {
	opt := nbdwire.AppendOption
	meta := func(name string, qs ...string) []byte { return nbdwire.AppendMetaContextQuery(nil, name, qs...) }
	req := func(b []byte, ext bool, r Request, payload []byte) []byte {
		b, _ = nbdwire.AppendRequest(b, r, ext)
		return append(b, payload...)
	}
	flags := binary.BigEndian.AppendUint32(nil, nbdwire.ClientFlagFixedNewstyle|nbdwire.ClientFlagNoZeroes)
	commands := func(b []byte, ext bool) []byte {
		b = req(b, ext, Request{Type: nbdwire.CmdWrite, Flags: nbdwire.CmdFlagFUA, Cookie: 1, Offset: 512, Length: 8}, []byte("abcdefgh"))
		b = req(b, ext, Request{Type: nbdwire.CmdRead, Cookie: 2, Offset: 0, Length: 128 << 10}, nil)
		b = req(b, ext, Request{Type: nbdwire.CmdRead, Flags: nbdwire.CmdFlagDF, Cookie: 3, Offset: 0, Length: 4096}, nil)
		b = req(b, ext, Request{Type: nbdwire.CmdBlockStatus, Flags: nbdwire.CmdFlagReqOne, Cookie: 4, Length: 1 << 20}, nil)
		b = req(b, ext, Request{Type: nbdwire.CmdWriteZeroes, Flags: nbdwire.CmdFlagFastZero | nbdwire.CmdFlagNoHole, Cookie: 5, Length: 4096}, nil)
		b = req(b, ext, Request{Type: nbdwire.CmdWriteZeroes, Cookie: 6, Length: 4096}, nil)
		b = req(b, ext, Request{Type: nbdwire.CmdTrim, Cookie: 7, Length: 4096}, nil)
		b = req(b, ext, Request{Type: nbdwire.CmdCache, Cookie: 8, Length: 4096}, nil)
		b = req(b, ext, Request{Type: nbdwire.CmdFlush, Cookie: 9}, nil)
		b = req(b, ext, Request{Type: nbdwire.CmdRead, Cookie: 10, Offset: 1 << 30, Length: 1 << 30}, nil)
		return req(b, ext, Request{Type: nbdwire.CmdDisc, Cookie: 11}, nil)
	}

	var out []seedConv
	b := opt(append([]byte(nil), flags...), nbdwire.OptGo, infoData("disk", nbdwire.InfoName, nbdwire.InfoDescription, nbdwire.InfoBlockSize))
	out = append(out, seedConv{"simple-go", commands(b, false)})

	b = opt(append([]byte(nil), flags...), nbdwire.OptList, nil)
	b = opt(b, nbdwire.OptInfo, infoData(""))
	b = opt(b, nbdwire.OptStructuredReply, nil)
	b = opt(b, nbdwire.OptListMetaContext, meta("disk"))
	b = opt(b, nbdwire.OptSetMetaContext, meta("disk", nameBaseAllocation, nameAllocDepth))
	b = opt(b, nbdwire.OptGo, infoData("disk"))
	out = append(out, seedConv{"structured-meta", commands(b, false)})

	b = opt(append([]byte(nil), flags...), nbdwire.OptExtendedHeaders, nil)
	b = opt(b, nbdwire.OptSetMetaContext, meta("disk", "base:"))
	b = opt(b, nbdwire.OptSetMetaContext, meta("disk", nameBaseAllocation))
	b = opt(b, nbdwire.OptGo, infoData("disk"))
	out = append(out, seedConv{"extended", commands(b, true)})

	b = opt(append([]byte(nil), flags...), nbdwire.OptExportName, []byte("disk"))
	out = append(out, seedConv{"export-name", commands(b, false)})

	b = opt(append([]byte(nil), flags...), 42, []byte("?"))
	b = opt(b, nbdwire.OptAbort, nil)
	out = append(out, seedConv{"unknown-option-abort", b})

	b = opt(append([]byte(nil), flags...), nbdwire.OptGo, []byte{0xff, 0xff, 0xff, 0xff, 0, 0})
	out = append(out, seedConv{"go-name-length-overflow", b})

	b = opt(append([]byte(nil), flags...), nbdwire.OptSetMetaContext, meta("disk", "x"))
	out = append(out, seedConv{"meta-without-structured", b})

	b = opt(append([]byte(nil), flags...), nbdwire.OptGo, infoData("disk"))
	b = req(b, false, Request{Type: nbdwire.CmdWrite, Cookie: 1, Length: 0xffffffff}, nil)
	out = append(out, seedConv{"write-payload-too-big", b})

	b = opt(append([]byte(nil), flags...), nbdwire.OptGo, infoData("disk"))
	b = append(b, bytes.Repeat([]byte{0x41}, 40)...)
	out = append(out, seedConv{"request-bad-magic", b})

	out = append(out, seedConv{"client-flags-unknown", []byte{0xff, 0xff, 0xff, 0xff}})
	return out
}

// seedTLSConversations are client streams for a TLS-only server, with
// STARTTLS taken to leave the stream as it is (see FuzzNegotiateTLS).
func seedTLSConversations() []seedConv {
	opt := func(b []byte, o uint32, d []byte) []byte {
		b = binary.BigEndian.AppendUint64(b, nbdwire.MagicOption)
		b = binary.BigEndian.AppendUint32(b, o)
		b = binary.BigEndian.AppendUint32(b, uint32(len(d)))
		return append(b, d...)
	}
	goData := infoData("disk")
	flags := binary.BigEndian.AppendUint32(nil, nbdwire.ClientFlagFixedNewstyle|nbdwire.ClientFlagNoZeroes)
	var out []seedConv

	b := opt(append([]byte(nil), flags...), nbdwire.OptList, nil)
	b = opt(b, nbdwire.OptGo, goData)
	b = opt(b, nbdwire.OptStartTLS, []byte("x"))
	b = opt(b, nbdwire.OptStartTLS, nil)
	b = opt(b, nbdwire.OptStartTLS, nil)
	b = opt(b, nbdwire.OptStructuredReply, nil)
	b = opt(b, nbdwire.OptGo, goData)
	out = append(out, seedConv{"tls-refused-then-starttls-go", b})

	b = opt(append([]byte(nil), flags...), nbdwire.OptExportName, []byte("disk"))
	out = append(out, seedConv{"tls-export-name-before-starttls", b})

	b = opt(binary.BigEndian.AppendUint32(nil, 0), nbdwire.OptStartTLS, nil)
	out = append(out, seedConv{"tls-no-fixed-newstyle", b})

	b = opt(append([]byte(nil), flags...), 99, []byte("?"))
	b = opt(b, nbdwire.OptAbort, nil)
	out = append(out, seedConv{"tls-unknown-option-abort", b})
	return out
}

// TestWriteSeeds rewrites the seed corpora when -write-seeds is given and
// otherwise checks they are present.
func TestWriteSeeds(t *testing.T) {
	check := func(p, want string) {
		if *writeSeeds {
			os.MkdirAll(filepath.Dir(p), 0o755)
			if err := os.WriteFile(p, []byte(want), 0o644); err != nil {
				t.Fatal(err)
			}
			return
		}
		if got, err := os.ReadFile(p); err != nil || string(got) != want {
			t.Errorf("seed %s missing or stale; run go test -run TestWriteSeeds -write-seeds", p)
		}
	}
	for _, ext := range []bool{false, true} {
		b, _ := nbdwire.AppendRequest(nil, Request{Flags: nbdwire.CmdFlagDF, Type: nbdwire.CmdRead, Cookie: 1, Offset: 1 << 40, Length: 1 << 31}, ext)
		check(filepath.Join("testdata", "fuzz", "FuzzParseRequest", fmt.Sprintf("read-ext-%v", ext)),
			fmt.Sprintf("go test fuzz v1\n[]byte(%s)\nbool(%v)\n", strconv.Quote(string(b)), ext))
	}
	check(filepath.Join("testdata", "fuzz", "FuzzParseRequest", "bad-magic"),
		fmt.Sprintf("go test fuzz v1\n[]byte(%s)\nbool(false)\n", strconv.Quote(string(make([]byte, 28)))))
	for _, s := range seedTLSConversations() {
		check(filepath.Join("testdata", "fuzz", "FuzzNegotiateTLS", s.name),
			fmt.Sprintf("go test fuzz v1\n[]byte(%s)\n", strconv.Quote(string(s.data))))
	}
	for _, target := range []string{"FuzzNegotiate", "FuzzServeConn"} {
		dir := filepath.Join("testdata", "fuzz", target)
		for _, s := range seedConversations() {
			p := filepath.Join(dir, s.name)
			check(p, fmt.Sprintf("go test fuzz v1\n[]byte(%s)\n", strconv.Quote(string(s.data))))
		}
	}
}
