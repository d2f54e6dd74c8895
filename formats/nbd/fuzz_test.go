package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/internal/nbdwire"
)

var update = flag.Bool("update", false, "rewrite testdata/stream-*.bin seed files")

// Server byte streams for the fuzz target. The client's cookies start at
// 1 and its requests in fuzzOps go out in this order: READ 4096 at 0 (1),
// BLOCK_STATUS (2), WRITE (3), FLUSH (4), WRITE_ZEROES (5).
var be = binary.BigEndian

func greeting(structured, meta, goOK bool, size uint64, flags uint16) []byte {
	b := be.AppendUint64(nil, nbdwire.MagicNBD)
	b = be.AppendUint64(b, nbdwire.MagicOption)
	b = be.AppendUint16(b, nbdwire.FlagFixedNewstyle|nbdwire.FlagNoZeroes)
	rep := func(b []byte, opt, typ uint32, data []byte) []byte {
		b = be.AppendUint64(b, nbdwire.MagicOptionReply)
		b = be.AppendUint32(b, opt)
		b = be.AppendUint32(b, typ)
		b = be.AppendUint32(b, uint32(len(data)))
		return append(b, data...)
	}
	if !structured {
		b = rep(rep(b, nbdwire.OptStructuredReply, nbdwire.RepErrUnsupported, nil), nbdwire.OptGo, nbdwire.RepInfo,
			be.AppendUint16(be.AppendUint64(be.AppendUint16(nil, nbdwire.InfoExport), size), flags))
		return rep(b, nbdwire.OptGo, nbdwire.RepAck, nil)
	}
	b = rep(b, nbdwire.OptStructuredReply, nbdwire.RepAck, nil)
	if meta {
		b = rep(b, nbdwire.OptSetMetaContext, nbdwire.RepMetaContext, append(be.AppendUint32(nil, 1), nbdwire.MetaBaseAllocation...))
	}
	b = rep(b, nbdwire.OptSetMetaContext, nbdwire.RepAck, nil)
	if !goOK {
		b = rep(b, nbdwire.OptGo, nbdwire.RepErrUnsupported, nil)
		return be.AppendUint16(be.AppendUint64(b, size), flags)
	}
	b = rep(b, nbdwire.OptGo, nbdwire.RepInfo, be.AppendUint16(be.AppendUint64(be.AppendUint16(nil, nbdwire.InfoExport), size), flags))
	return rep(b, nbdwire.OptGo, nbdwire.RepAck, nil)
}

func simpleRep(code uint32, cookie uint64, data []byte) []byte {
	return append(be.AppendUint64(be.AppendUint32(be.AppendUint32(nil, nbdwire.MagicSimpleReply), code), cookie), data...)
}

func chunkRep(flags, typ uint16, cookie uint64, payload []byte) []byte {
	b := be.AppendUint32(nil, nbdwire.MagicChunkReply)
	b = be.AppendUint16(b, flags)
	b = be.AppendUint16(b, typ)
	b = be.AppendUint64(b, cookie)
	b = be.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

// seedStreams: name -> {handshake bytes, reply bytes}.
func seedStreams() map[string][2][]byte {
	const flags = nbdwire.TransHasFlags | nbdwire.TransSendFlush | nbdwire.TransSendWriteZeroes | nbdwire.TransSendTrim
	g := greeting(true, true, true, 1<<20, flags)
	data := append(be.AppendUint64(nil, 0), make([]byte, 4096)...)
	bs := func(ctx, n, fl uint32) []byte {
		return be.AppendUint32(be.AppendUint32(be.AppendUint32(nil, ctx), n), fl)
	}
	goodRest := cat(chunkRep(nbdwire.ChunkFlagDone, nbdwire.ChunkBlockStatus, 2, bs(1, 1<<20, 3)),
		simpleRep(0, 3, nil), simpleRep(0, 4, nil), simpleRep(0, 5, nil))
	return map[string][2][]byte{
		"stream-good-structured": {g, cat(
			chunkRep(0, nbdwire.ChunkOffsetData, 1, data[:8+2048]),
			chunkRep(nbdwire.ChunkFlagDone, nbdwire.ChunkOffsetHole, 1, be.AppendUint32(be.AppendUint64(nil, 2048), 2048)), goodRest)},
		"stream-good-simple": {greeting(false, false, true, 1<<20, flags),
			cat(simpleRep(0, 1, make([]byte, 4096)), simpleRep(22, 2, nil), simpleRep(0, 3, nil), simpleRep(0, 4, nil), simpleRep(0, 5, nil))},
		"stream-good-export-name":   {greeting(true, true, false, 1<<20, flags), cat(chunkRep(nbdwire.ChunkFlagDone, nbdwire.ChunkOffsetData, 1, data), goodRest)},
		"stream-oldstyle":           {cat(be.AppendUint64(nil, nbdwire.MagicNBD), be.AppendUint64(nil, nbdwire.MagicOldstyle), make([]byte, 136)), nil},
		"stream-not-fixed-newstyle": {cat(be.AppendUint64(nil, nbdwire.MagicNBD), be.AppendUint64(nil, nbdwire.MagicOption), []byte{0, 0}), nil},
		"stream-huge-option-reply": {cat(g[:18], be.AppendUint64(nil, nbdwire.MagicOptionReply), be.AppendUint32(nil, nbdwire.OptStructuredReply),
			be.AppendUint32(nil, nbdwire.RepAck), be.AppendUint32(nil, 0xffffffff)), nil},
		"stream-bad-reply-magic":        {g, cat([]byte{0xde, 0xad, 0xbe, 0xef}, make([]byte, 12))},
		"stream-unknown-cookie":         {g, simpleRep(0, 99, nil)},
		"stream-chunk-outside-read":     {g, chunkRep(nbdwire.ChunkFlagDone, nbdwire.ChunkOffsetData, 1, append(be.AppendUint64(nil, 1<<19), 1, 2, 3))},
		"stream-hole-overflow":          {g, chunkRep(nbdwire.ChunkFlagDone, nbdwire.ChunkOffsetHole, 1, be.AppendUint32(be.AppendUint64(nil, 0xfffffffffffff000), 0xffffffff))},
		"stream-read-not-covered":       {g, chunkRep(nbdwire.ChunkFlagDone, nbdwire.ChunkOffsetData, 1, data[:8+100])},
		"stream-read-chunks-overlap":    {g, cat(chunkRep(0, nbdwire.ChunkOffsetData, 1, data[:8+2048]), chunkRep(nbdwire.ChunkFlagDone, nbdwire.ChunkOffsetData, 1, data[:8+4096]))},
		"stream-error-chunk-long-msg":   {g, chunkRep(nbdwire.ChunkFlagDone, nbdwire.ChunkErrorBit|1, 1, append(be.AppendUint16(be.AppendUint32(nil, 5), 0xffff), "short"...))},
		"stream-read-simple-truncated":  {greeting(false, false, true, 1<<20, flags), simpleRep(0, 1, make([]byte, 100))},
		"stream-block-status-wrong-ctx": {g, cat(chunkRep(nbdwire.ChunkFlagDone, nbdwire.ChunkOffsetData, 1, data), chunkRep(nbdwire.ChunkFlagDone, nbdwire.ChunkBlockStatus, 2, bs(9, 4096, 0)))},
		"stream-block-status-zero-len":  {g, cat(chunkRep(nbdwire.ChunkFlagDone, nbdwire.ChunkOffsetData, 1, data), chunkRep(nbdwire.ChunkFlagDone, nbdwire.ChunkBlockStatus, 2, bs(1, 0, 0)))},
		"stream-block-status-huge":      {g, cat(chunkRep(nbdwire.ChunkFlagDone, nbdwire.ChunkOffsetData, 1, data), be.AppendUint32(nil, nbdwire.MagicChunkReply), []byte{0, 1, 0, 5}, be.AppendUint64(nil, 2), be.AppendUint32(nil, 0xfffffff4))},
		"stream-size-huge":              {greeting(true, true, true, 1<<63, flags), nil},
		"stream-ext-header-reply":       {g, cat(be.AppendUint32(nil, nbdwire.MagicExtReply), make([]byte, 28))},
	}
}

// seedFile packs a seed as: u32 handshake length | handshake | replies.
func seedFile(s [2][]byte) []byte {
	return cat(be.AppendUint32(nil, uint32(len(s[0]))), s[0], s[1])
}

func unpackSeed(b []byte) (hs, replies []byte, ok bool) {
	if len(b) < 4 || int(be.Uint32(b)) > len(b)-4 {
		return nil, nil, false
	}
	n := int(be.Uint32(b))
	return b[4 : 4+n], b[4+n:], true
}

func TestSeedFiles(t *testing.T) {
	for name, s := range seedStreams() {
		p := filepath.Join("testdata", name+".bin")
		if *update {
			if err := os.WriteFile(p, seedFile(s), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(p)
		if err != nil || string(got) != string(seedFile(s)) {
			t.Errorf("%s is stale or missing (go test -run TestSeedFiles ./formats/nbd -args -update): %v", p, err)
		}
	}
}

// TestSeedStreams runs every seed once with its expected outcome: good
// streams serve the requests, each faulty one fails them with a clean
// error, and none panics or hangs.
func TestSeedStreams(t *testing.T) {
	for name, s := range seedStreams() {
		t.Run(name, func(t *testing.T) {
			res := fuzzOps(s[0], s[1], 10*time.Second)
			good := strings.HasPrefix(name, "stream-good")
			switch {
			case good && (res.open != nil || res.read != nil || res.flush != nil):
				t.Fatalf("good stream failed: %+v", res)
			case !good && res.open == nil && res.read == nil && res.status == nil:
				t.Fatal("faulty stream was served")
			}
			for _, err := range []error{res.read, res.status, res.write, res.flush, res.zero} {
				if err != nil && res.open == nil && !errors.Is(err, unix.EIO) && !errors.Is(err, unix.EINVAL) {
					t.Fatalf("request error %v is not an I/O error", err)
				}
			}
		})
	}
}

type opsResult struct{ open, read, status, write, flush, zero error }

// fuzzOps plays the client against a fake server that sends hs, waits
// until the client has sent its five requests (or hung up), sends
// replies, and stops talking. Requests go out in a fixed order, so the
// cookies are known: READ 4096 at 0 (1), BLOCK_STATUS (2), WRITE (3),
// FLUSH (4), WRITE_ZEROES (5). Waiting for all five before replying keeps
// replies from arriving before their requests.
func fuzzOps(hs, replies []byte, timeout time.Duration) (res opsResult) {
	dial := func(context.Context) (net.Conn, error) {
		c, s, err := socketPair()
		if err != nil {
			return nil, err
		}
		go func() {
			defer s.Close()
			seen := make(chan struct{})
			go func() {
				magic := be.AppendUint32(nil, nbdwire.MagicRequest)
				var got []byte
				buf := make([]byte, 4096)
				signalled := false
				for {
					n, err := s.Read(buf)
					got = append(got, buf[:n]...)
					if !signalled && (err != nil || bytes.Count(got, magic) >= 5) {
						close(seen)
						signalled = true
					}
					if err != nil {
						return
					}
				}
			}()
			s.Write(hs)
			<-seen
			s.Write(replies)
			// Half-close: the client reads EOF but can still send.
			s.CloseWrite()
			io.Copy(io.Discard, s)
		}()
		return c, nil
	}
	img, err := Open("nbd+unix:///?socket=fuzz", Options{dial: dial, noReconnect: true, Timeout: timeout})
	if err != nil {
		res.open = err
		return res
	}
	defer img.Close()
	n := uint32(min(img.Size(), 4096))
	buf := make([]byte, n)
	reqs := []*request{
		{cmd: nbdwire.CmdRead, length: n, buf: buf},
		{cmd: nbdwire.CmdBlockStatus, length: n},
		{cmd: nbdwire.CmdWrite, length: n, buf: make([]byte, n)},
		{cmd: nbdwire.CmdFlush},
		{cmd: nbdwire.CmdWriteZeroes, length: n},
	}
	for _, r := range reqs {
		img.submit(r)
	}
	errs := make([]error, len(reqs))
	for i, r := range reqs {
		errs[i] = img.wait(r)
	}
	res.read, res.status, res.write, res.flush, res.zero = errs[0], errs[1], errs[2], errs[3], errs[4]
	if errs[1] == nil {
		if len(reqs[1].extents) == 0 {
			res.status = errors.New("block status succeeded with no extents")
		}
	}
	// The public paths on whatever state is left: must not panic.
	img.ReadAt(buf, 0)
	img.Map(0, img.Size())
	return res
}

// FuzzServerStream: whatever bytes a server sends, the client never
// panics and never hangs.
func FuzzServerStream(f *testing.F) {
	names, _ := filepath.Glob("testdata/stream-*.bin")
	for _, n := range names {
		b, err := os.ReadFile(n)
		if err != nil {
			f.Fatal(err)
		}
		hs, replies, ok := unpackSeed(b)
		if !ok {
			f.Fatalf("%s: bad seed file", n)
		}
		f.Add(hs, replies)
	}
	f.Fuzz(func(t *testing.T, hs, replies []byte) {
		// A short deadline: a stream that stops mid-handshake leaves
		// the client waiting for bytes that never come until then.
		fuzzOps(hs, replies, 20*time.Millisecond)
	})
}

func socketPair() (net.Conn, *net.UnixConn, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		conns[i], err = net.FileConn(f)
		f.Close()
		if err != nil {
			return nil, nil, err
		}
	}
	return conns[0], conns[1].(*net.UnixConn), nil
}

func cat(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

// FuzzParseURI: accepted URIs round-trip through String.
func FuzzParseURI(f *testing.F) {
	for _, s := range []string{"nbd+unix:///exp?socket=/run/x.sock", "nbd://127.0.0.1:10809/e", "nbd:nbd://[::1]/", "nbds://h/"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseURI(s)
		if err != nil {
			if !errors.Is(err, ErrBadURI) {
				t.Fatalf("unclassified %v", err)
			}
			return
		}
		u2, err := ParseURI(u.String())
		if err != nil || u2 != u {
			t.Fatalf("%q -> %+v -> %q -> %+v, %v", s, u, u.String(), u2, err)
		}
	})
}
