package nbd

import (
	"bufio"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/nbdwire"
)

func BenchmarkParseRequest(b *testing.B) {
	hdr, _ := nbdwire.AppendRequest(nil, Request{Type: nbdwire.CmdRead, Cookie: 1, Offset: 4096, Length: 4096}, false)
	b.ReportAllocs()
	for b.Loop() {
		// What the read loop calls for every request.
		if _, err := nbdwire.ParseRequest(hdr, false); err != nil {
			b.Fatal(err)
		}
	}
}

// discardConn is a net.Conn that swallows writes.
type discardConn struct{ net.Conn }

func (discardConn) Write(p []byte) (int, error) { return len(p), nil }
func (discardConn) Close() error                { return nil }

// BenchmarkReplyWrite runs a 4 KiB read through handle and the writer
// role: backend read, reply header, writev, recycle.
func BenchmarkReplyWrite(b *testing.B) {
	for _, structured := range []bool{false, true} {
		name := "simple"
		if structured {
			name = "structured"
		}
		b.Run(name, func(b *testing.B) {
			s := &Server{Export: Export{Backend: newMem(1 << 20)}}
			sess := &session{structured: structured}
			c := newConn(s, discardConn{}, nil, sess)
			b.ReportAllocs()
			b.SetBytes(4096)
			for b.Loop() {
				r := <-c.free
				r.Request = Request{Type: nbdwire.CmdRead, Cookie: 1, Offset: 8192, Length: 4096}
				c.handle(r)
			}
		})
	}
}

// BenchmarkUnixSocket drives an in-memory export over a unix socket with
// a lean pipelined client (queue depth 16, simple replies): the server's
// whole per-request cost, the client's included.
func BenchmarkUnixSocket(b *testing.B) {
	for _, op := range []struct {
		name string
		typ  uint16
	}{{"read4k", nbdwire.CmdRead}, {"write4k", nbdwire.CmdWrite}} {
		b.Run(op.name, func(b *testing.B) {
			_, sock, _ := startServer(b, Export{Name: "disk", Backend: newMem(64 << 20)})
			tc := dial(b, sock)
			tc.c.SetDeadline(time.Time{})
			if err := tc.handshake("disk", false, false); err != nil {
				b.Fatal(err)
			}
			pipeline(b, bufio.NewReaderSize(tc.c, 256<<10), bufio.NewWriterSize(tc.c, 256<<10), op.typ)
		})
	}
}

// pipeline is the lean client's loop: b.N 4 KiB requests of typ (read
// or write) at queue depth 16 with simple replies, each checked for
// success; the timer starts here.
func pipeline(b *testing.B, br *bufio.Reader, bw *bufio.Writer, typ uint16) {
	const qd, bs = 16, 4096
	var out []byte
	payload := make([]byte, bs)
	rbuf := make([]byte, nbdwire.SimpleReplySize+bs)
	b.SetBytes(bs)
	b.ReportAllocs()
	b.ResetTimer()
	sent, recvd := 0, 0
	for recvd < b.N {
		for sent < b.N && sent-recvd < qd {
			out, _ = nbdwire.AppendRequest(out[:0], Request{Type: typ, Cookie: uint64(sent),
				Offset: uint64(sent%16384) * bs, Length: bs}, false)
			bw.Write(out)
			if typ == nbdwire.CmdWrite {
				bw.Write(payload)
			}
			sent++
		}
		bw.Flush()
		for recvd < sent {
			n := nbdwire.SimpleReplySize
			if typ == nbdwire.CmdRead {
				n += bs
			}
			if _, err := io.ReadFull(br, rbuf[:n]); err != nil {
				b.Fatal(err)
			}
			if binary.BigEndian.Uint32(rbuf[4:]) != 0 {
				b.Fatal("error reply")
			}
			recvd++
			if br.Buffered() < nbdwire.SimpleReplySize && sent < b.N {
				break // refill the queue before waiting
			}
		}
	}
}
