package nbd

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/imagetest"
	"github.com/blktap-go/blktap/internal/nbdwire"
)

// fakeServer is a small in-process NBD server for behaviours the real
// servers cannot be made to show: no GO (old servers), reads answered in
// several out-of-order chunks with holes, replies out of request order.
type fakeServer struct {
	noGo     bool // answer GO with ERR_UNSUP: the client must use EXPORT_NAME
	noZeroes bool // offer NO_ZEROES
	mu       sync.Mutex
	disk     []byte
}

func (f *fakeServer) dial(context.Context) (net.Conn, error) {
	c, s := net.Pipe()
	go f.serve(s)
	return c, nil
}

func (f *fakeServer) serve(c net.Conn) {
	defer c.Close()
	structured, ok := f.handshake(c)
	if !ok {
		return
	}
	fc := &fakeConn{f: f, c: c, structured: structured}
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		var h [28]byte
		if _, err := io.ReadFull(c, h[:]); err != nil {
			return
		}
		cmd, cookie, off, n := be.Uint16(h[6:8]), be.Uint64(h[8:16]), be.Uint64(h[16:24]), be.Uint32(h[24:28])
		var payload []byte
		if cmd == nbdwire.CmdWrite {
			payload = make([]byte, n)
			if _, err := io.ReadFull(c, payload); err != nil {
				return
			}
		}
		if cmd == nbdwire.CmdDisc {
			return
		}
		// Each request answered by its own goroutine: replies come
		// back in whatever order they finish.
		wg.Go(func() { fc.answer(cmd, cookie, off, n, payload) })
	}
}

// handshake runs the fixed-newstyle negotiation; it reports whether the
// client asked for structured replies, and false once the connection fails.
func (f *fakeServer) handshake(c net.Conn) (structured, ok bool) {
	hs := uint16(nbdwire.FlagFixedNewstyle)
	if f.noZeroes {
		hs |= nbdwire.FlagNoZeroes
	}
	b := be.AppendUint64(nil, nbdwire.MagicNBD)
	b = be.AppendUint64(b, nbdwire.MagicOption)
	c.Write(be.AppendUint16(b, hs))
	var cf [4]byte
	if _, err := io.ReadFull(c, cf[:]); err != nil {
		return false, false
	}
	reply := func(opt, typ uint32, data []byte) {
		b := be.AppendUint64(nil, nbdwire.MagicOptionReply)
		b = be.AppendUint32(b, opt)
		b = be.AppendUint32(b, typ)
		b = be.AppendUint32(b, uint32(len(data)))
		c.Write(append(b, data...))
	}
	for {
		var h [16]byte
		if _, err := io.ReadFull(c, h[:]); err != nil {
			return false, false
		}
		opt, n := be.Uint32(h[8:12]), be.Uint32(h[12:16])
		data := make([]byte, n)
		if _, err := io.ReadFull(c, data); err != nil {
			return false, false
		}
		info := be.AppendUint16(nil, nbdwire.InfoExport)
		info = be.AppendUint64(info, uint64(len(f.disk)))
		info = be.AppendUint16(info, nbdwire.TransHasFlags|nbdwire.TransSendFlush|nbdwire.TransSendWriteZeroes)
		switch {
		case opt == nbdwire.OptStructuredReply && !f.noGo:
			structured = true
			reply(opt, nbdwire.RepAck, nil)
		case opt == nbdwire.OptSetMetaContext:
			reply(opt, nbdwire.RepMetaContext, append(be.AppendUint32(nil, 7), nbdwire.MetaBaseAllocation...))
			reply(opt, nbdwire.RepAck, nil)
		case opt == nbdwire.OptGo && !f.noGo:
			reply(opt, nbdwire.RepInfo, info)
			reply(opt, nbdwire.RepInfo, be.AppendUint32(be.AppendUint32(be.AppendUint32(be.AppendUint16(nil, nbdwire.InfoBlockSize), 1), 4096), 64<<10))
			reply(opt, nbdwire.RepAck, nil)
			return structured, true
		case opt == nbdwire.OptExportName:
			out := info[2:]
			if !f.noZeroes {
				out = append(out, make([]byte, 124)...)
			}
			c.Write(out)
			return structured, true
		default:
			reply(opt, nbdwire.RepErrUnsupported, []byte("not here"))
		}
	}
}

// fakeConn is one negotiated connection of the fake server in its
// transmission phase; wmu keeps each reply's parts together on the wire.
type fakeConn struct {
	f          *fakeServer
	c          net.Conn
	structured bool
	wmu        sync.Mutex
}

func (fc *fakeConn) send(parts ...[]byte) {
	fc.wmu.Lock()
	defer fc.wmu.Unlock()
	for _, p := range parts {
		fc.c.Write(p)
	}
}

func (fc *fakeConn) answer(cmd uint16, cookie, off uint64, n uint32, payload []byte) {
	f := fc.f
	simple := simpleRep(0, cookie, nil)
	f.mu.Lock()
	defer f.mu.Unlock()
	switch cmd {
	case nbdwire.CmdWrite:
		copy(f.disk[off:], payload)
		fc.send(simple)
	case nbdwire.CmdWriteZeroes:
		clear(f.disk[off : off+uint64(n)])
		fc.send(simple)
	case nbdwire.CmdRead:
		if !fc.structured {
			fc.send(simple, f.disk[off:off+uint64(n)])
			return
		}
		fc.readChunks(cookie, off, n)
	case nbdwire.CmdBlockStatus:
		fc.send(chunkRep(nbdwire.ChunkFlagDone, nbdwire.ChunkBlockStatus, cookie, f.extents(off, n)))
	default:
		fc.send(simple)
	}
}

// readChunks answers a read in three pieces, last first; an all-zero piece
// as a hole.
func (fc *fakeConn) readChunks(cookie, off uint64, n uint32) {
	data := fc.f.disk[off : off+uint64(n)]
	cut1, cut2 := uint64(n)/3, 2*uint64(n)/3
	pieces := [][2]uint64{{cut2, uint64(n)}, {cut1, cut2}, {0, cut1}}
	for _, p := range pieces {
		if p[0] == p[1] {
			continue
		}
		seg := data[p[0]:p[1]]
		if bytes.Count(seg, []byte{0}) == len(seg) {
			fc.send(chunkRep(0, nbdwire.ChunkOffsetHole, cookie, be.AppendUint32(be.AppendUint64(nil, off+p[0]), uint32(len(seg)))))
		} else {
			fc.send(chunkRep(0, nbdwire.ChunkOffsetData, cookie, append(be.AppendUint64(nil, off+p[0]), seg...)))
		}
	}
	fc.send(chunkRep(nbdwire.ChunkFlagDone, nbdwire.ChunkNone, cookie, nil))
}

// extents is a block-status payload for the base:allocation context: one
// extent per 4 KiB page, merged; zero pages are holes. Callers hold f.mu.
func (f *fakeServer) extents(off uint64, n uint32) []byte {
	pl := be.AppendUint32(nil, 7)
	var runLen, runFlags uint32
	for p := off; p < off+uint64(n); p += 4096 {
		end := min(p+4096, off+uint64(n))
		fl := uint32(0)
		if bytes.Count(f.disk[p:end], []byte{0}) == int(end-p) {
			fl = nbdwire.StateHole | nbdwire.StateZero
		}
		if runLen > 0 && fl != runFlags {
			pl = be.AppendUint32(be.AppendUint32(pl, runLen), runFlags)
			runLen = 0
		}
		runLen += uint32(end - p)
		runFlags = fl
	}
	return be.AppendUint32(be.AppendUint32(pl, runLen), runFlags)
}

func openFake(t *testing.T, f *fakeServer) *Image {
	t.Helper()
	img, err := Open("nbd+unix:///x?socket=/nonexistent", Options{dial: f.dial, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

func TestFakeExportNameFallback(t *testing.T) {
	for _, nz := range []bool{false, true} {
		f := &fakeServer{noGo: true, noZeroes: nz, disk: make([]byte, 1<<20)}
		img := openFake(t, f)
		if img.Size() != 1<<20 {
			t.Fatalf("size %d", img.Size())
		}
		p := imagetest.Pattern(5, 70000)
		if _, err := img.WriteAt(p, 999); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(p))
		if _, err := img.ReadAt(got, 999); err != nil || !bytes.Equal(got, p) {
			t.Fatalf("noZeroes=%v: read back: %v", nz, err)
		}
		if m, err := img.Map(0, 1<<20); err != nil || len(m) != 1 || m[0].Kind != image.Data {
			t.Fatalf("map without structured replies: %+v %v", m, err)
		}
	}
}

func TestFakeChunkedReads(t *testing.T) {
	f := &fakeServer{disk: make([]byte, 1<<20)}
	copy(f.disk[300000:], imagetest.Pattern(6, 100000))
	copy(f.disk[700000:], imagetest.Pattern(7, 5))
	img := openFake(t, f)
	// Larger than the 64 KiB maximum payload the fake announces, so the
	// read is split too, and every piece comes back in three chunks.
	got := bytes.Repeat([]byte{0xff}, 1<<20)
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, f.disk) {
		t.Fatalf("chunked read differs at %d", imagetest.FirstDiff(got, f.disk))
	}
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Go(func() {
			off := int64(i * 65536)
			p := imagetest.Pattern(uint64(100+i), 4096*(i+1))
			if _, err := img.WriteAt(p, off); err != nil {
				t.Error(err)
				return
			}
			g := make([]byte, len(p))
			if _, err := img.ReadAt(g, off); err != nil || !bytes.Equal(g, p) {
				t.Errorf("%d: %v", i, err)
			}
		})
	}
	wg.Wait()
	img.Discard(0, 1<<20)
	img.WriteAt([]byte{1}, 8192)
	m, err := img.Map(0, 1<<20)
	want := []image.Extent{{Offset: 0, Length: 8192, Kind: image.Hole}, {Offset: 8192, Length: 4096, Kind: image.Data},
		{Offset: 12288, Length: 1<<20 - 12288, Kind: image.Hole}}
	if err != nil || len(m) != 3 || m[0] != want[0] || m[1] != want[1] || m[2] != want[2] {
		t.Fatalf("map: %+v %v", m, err)
	}
}

func TestOpenFailures(t *testing.T) {
	// A listener that never speaks: the handshake must time out.
	ln, err := net.Listen("unix", sockPath(t, "silent.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	u := "nbd+unix:///?socket=" + ln.Addr().String()
	if _, err := Open(u, Options{Timeout: 200 * time.Millisecond}); err == nil {
		t.Fatal("open of a silent server succeeded")
	}
	if _, err := Open("nbd+unix:///?socket="+sockPath(t, "none.sock"), Options{Timeout: time.Second}); err == nil {
		t.Fatal("open of a missing socket succeeded")
	}
	if _, err := Open("http://x", Options{}); !errors.Is(err, ErrBadURI) {
		t.Fatalf("bad uri: %v", err)
	}
	// Garbage instead of a greeting.
	dial := func(context.Context) (net.Conn, error) {
		c, s := net.Pipe()
		go func() { s.Write([]byte("HTTP/1.1 400 Bad Request\r\n\r\n")); s.Close() }()
		return c, nil
	}
	if _, err := Open("nbd+unix:///?socket=x", Options{dial: dial}); !errors.Is(err, image.ErrWrongFormat) {
		t.Fatalf("not an NBD server: %v", err)
	}
}
