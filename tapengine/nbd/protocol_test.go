package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/internal/nbdwire"
)

func newMem(size int) *memBackend { return &memBackend{data: make([]byte, size)} }

func connected(t *testing.T, sock string, structured, ext bool, meta ...string) *testClient {
	t.Helper()
	tc := dial(t, sock)
	if err := tc.handshake("disk", structured, ext, meta...); err != nil {
		t.Fatal(err)
	}
	return tc
}

// expectClosed checks that the server hung up on tc.
func expectClosed(t *testing.T, tc *testClient) {
	t.Helper()
	tc.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var b [1]byte
	for {
		_, err := tc.br.Read(b[:])
		if err == nil {
			continue // replies already queued may still arrive
		}
		if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || isReset(err) {
			return
		}
		t.Fatalf("expected the server to close, got %v", err)
	}
}

func isReset(err error) bool {
	var oe *net.OpError
	return errors.As(err, &oe) && !oe.Timeout()
}

// mustOK checks a reply arrived without error: mustOK(t)(tc.do(...)).
func mustOK(t *testing.T) func(*reply, error) *reply {
	return func(rep *reply, err error) *reply {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		if rep.errno != 0 {
			t.Fatalf("reply errno %d", rep.errno)
		}
		return rep
	}
}

// Transmission: garbage and oversized requests drop that connection
// only; another client goes on being served.
func TestBadClientsDroppedOthersServed(t *testing.T) {
	be := newMem(1 << 20)
	s, sock, _ := startServer(t, Export{Name: "disk", Backend: be})
	good := connected(t, sock, true, false)

	cases := map[string]func(tc *testClient){
		"garbage magic": func(tc *testClient) { tc.c.Write(bytes.Repeat([]byte{0xde, 0xad}, 14)) },
		"write above the streamed maximum": func(tc *testClient) {
			tc.send(Request{Type: nbdwire.CmdWrite, Cookie: 1, Length: MaxStreamed + 1}, nil)
		},
		"extended request without negotiation": func(tc *testClient) {
			b, _ := nbdwire.AppendRequest(nil, Request{Type: nbdwire.CmdRead, Length: 512}, true)
			tc.c.Write(b)
		},
		"truncated header": func(tc *testClient) {
			tc.c.Write([]byte{0x25, 0x60, 0x95})
			tc.c.(*net.UnixConn).CloseWrite()
		},
	}
	for name, f := range cases {
		t.Run(name, func(t *testing.T) {
			tc := connected(t, sock, false, false)
			f(tc)
			expectClosed(t, tc)
			rep := mustOK(t)(good.do(Request{Type: nbdwire.CmdRead, Cookie: 7, Offset: 4096, Length: 4096}, nil))
			if d, err := rep.readData(4096, 4096); err != nil || len(d) != 4096 {
				t.Fatalf("good client read: %v", err)
			}
		})
	}
	if st := s.Stats(); st.Dropped < 3 {
		t.Errorf("Dropped = %d, want >= 3", st.Dropped)
	}
}

// A request that is wrong but leaves the stream in frame gets EINVAL
// and the connection goes on (proto.md "Request message", error values).
func TestInFrameErrorsKeepConnection(t *testing.T) {
	for _, mode := range []struct {
		name            string
		structured, ext bool
	}{{"simple", false, false}, {"structured", true, false}, {"extended", true, true}} {
		t.Run(mode.name, func(t *testing.T) {
			be := newMem(1 << 20)
			_, sock, _ := startServer(t, Export{Name: "disk", Backend: be})
			tc := connected(t, sock, mode.structured, mode.ext)
			bad := []struct {
				r     Request
				errno uint32
			}{
				{Request{Type: nbdwire.CmdRead, Length: 0xffffffff}, nbdwire.ErrnoInval},
				{Request{Type: nbdwire.CmdRead, Offset: 1<<64 - 1, Length: 2}, nbdwire.ErrnoInval},
				{Request{Type: nbdwire.CmdRead, Offset: 1 << 20, Length: 1}, nbdwire.ErrnoInval},
				{Request{Type: nbdwire.CmdCache, Offset: 1<<20 - 1, Length: 2}, nbdwire.ErrnoInval},
				{Request{Type: 42, Length: 512}, nbdwire.ErrnoInval},
				{Request{Type: nbdwire.CmdRead, Flags: 1 << 12, Length: 512}, nbdwire.ErrnoInval},
				{Request{Type: nbdwire.CmdTrim, Length: 512}, nbdwire.ErrnoInval}, // memBackend cannot discard
				{Request{Type: nbdwire.CmdBlockStatus, Length: 512}, nbdwire.ErrnoInval},
			}
			for i, b := range bad {
				b.r.Cookie = uint64(100 + i)
				rep, err := tc.do(b.r, nil)
				if err != nil {
					t.Fatalf("%+v: %v", b.r, err)
				}
				if rep.errno != b.errno || rep.cookie != b.r.Cookie {
					t.Errorf("%+v: errno %d cookie %d, want %d", b.r, rep.errno, rep.cookie, b.errno)
				}
			}
			// A write past the end still carries its payload, which
			// must be consumed to stay in frame.
			p := bytes.Repeat([]byte{1}, 4096)
			rep, err := tc.do(Request{Type: nbdwire.CmdWrite, Cookie: 9, Offset: 1<<20 - 2048, Length: 4096}, p)
			if err != nil || rep.errno != nbdwire.ErrnoNoSpace {
				t.Fatalf("write past end: %+v %v", rep, err)
			}
			mustOK(t)(tc.do(Request{Type: nbdwire.CmdWrite, Cookie: 10, Offset: 8192, Length: 4096}, p))
			rep = mustOK(t)(tc.do(Request{Type: nbdwire.CmdRead, Cookie: 11, Offset: 8192, Length: 4096}, nil))
			if d, err := rep.readData(8192, 4096); err != nil || !bytes.Equal(d, p) {
				t.Fatalf("read back: %v", err)
			}
			if mode.ext {
				for _, ch := range rep.chunks {
					if ch.offset != 8192 {
						t.Errorf("extended reply echoes offset %d, want 8192", ch.offset)
					}
				}
			}
		})
	}
}

// gateBackend blocks writes at offset 0 until released. (Writes, since
// the reader runs small reads itself and a blocked read would hold up the
// connection's reader by design.)
type gateBackend struct {
	*memBackend
	gate    chan struct{}
	entered chan struct{}
}

func (g *gateBackend) WriteAt(p []byte, off int64) (int, error) {
	if off == 0 {
		g.entered <- struct{}{}
		<-g.gate
	}
	return g.memBackend.WriteAt(p, off)
}

// Replies may go out of order (proto.md "Transmission"); a slow request
// does not hold up the others, and Close finishes what is in flight.
func TestOutOfOrderAndGracefulClose(t *testing.T) {
	g := &gateBackend{memBackend: newMem(1 << 20), gate: make(chan struct{}), entered: make(chan struct{}, 1)}
	s, sock, _ := startServer(t, Export{Name: "disk", Backend: g})
	tc := connected(t, sock, false, false)
	tc.send(Request{Type: nbdwire.CmdWrite, Cookie: 1, Offset: 0, Length: 5}, []byte("hello"))
	<-g.entered
	rep := mustOK(t)(tc.do(Request{Type: nbdwire.CmdRead, Cookie: 2, Offset: 4096, Length: 512}, nil))
	if rep.cookie != 2 {
		t.Fatalf("first reply is for cookie %d, want 2", rep.cookie)
	}
	closed := make(chan struct{})
	go func() { s.Close(); close(closed) }()
	select {
	case <-closed:
		t.Fatal("Close returned with a request in flight")
	case <-time.After(50 * time.Millisecond):
	}
	close(g.gate)
	rep = mustOK(t)(tc.recv())
	if rep.cookie != 1 {
		t.Fatalf("in-flight write after Close: cookie %d", rep.cookie)
	}
	<-closed
	expectClosed(t, tc)
	g.mu.RLock()
	defer g.mu.RUnlock()
	if string(g.data[:5]) != "hello" {
		t.Fatalf("write acknowledged but not in the backend: %q", g.data[:5])
	}
}

// NBD_CMD_DISC: requests sent before it are still answered.
func TestDiscAnswersInFlight(t *testing.T) {
	be := newMem(1 << 20)
	_, sock, _ := startServer(t, Export{Name: "disk", Backend: be})
	tc := connected(t, sock, true, false)
	p := bytes.Repeat([]byte{7}, 65536)
	for i := 0; i < 8; i++ {
		tc.send(Request{Type: nbdwire.CmdWrite, Cookie: uint64(i), Offset: uint64(i) * 65536, Length: 65536}, p)
	}
	tc.send(Request{Type: nbdwire.CmdDisc}, nil)
	seen := map[uint64]bool{}
	for i := 0; i < 8; i++ {
		rep := mustOK(t)(tc.recv())
		seen[rep.cookie] = true
	}
	if len(seen) != 8 {
		t.Fatalf("replies for %v", seen)
	}
	expectClosed(t, tc)
	be.mu.RLock()
	defer be.mu.RUnlock()
	for i, b := range be.data[:8*65536] {
		if b != 7 {
			t.Fatalf("byte %d not written", i)
		}
	}
}

// layered is a backend with a fixed map: data in the top layer, data from
// a backing layer, a zero run and a hole.
type layered struct{ *memBackend }

func (l layered) Map(off, n int64) ([]image.Extent, error) {
	all := []image.Extent{
		{Offset: 0, Length: 64 << 10, Kind: image.Data, Depth: 0},
		{Offset: 64 << 10, Length: 64 << 10, Kind: image.Data, Depth: 1},
		{Offset: 128 << 10, Length: 64 << 10, Kind: image.Zero, Depth: 0},
		{Offset: 192 << 10, Length: 1<<20 - 192<<10, Kind: image.Hole, Depth: 2},
	}
	var out []image.Extent
	for _, e := range all {
		s, t := max(e.Offset, off), min(e.Offset+e.Length, off+n)
		if s < t {
			e.Offset, e.Length = s, t-s
			out = append(out, e)
		}
	}
	return out, nil
}

// Structured and extended replies: sparse reads, block status for both
// contexts, REQ_ONE, DF.
func TestSparseReadAndBlockStatus(t *testing.T) {
	for _, ext := range []bool{false, true} {
		be := layered{newMem(1 << 20)}
		for i := range 128 << 10 {
			be.data[i] = byte(i%251) + 1
		}
		_, sock, _ := startServer(t, Export{Name: "disk", Backend: be})
		tc := connected(t, sock, true, ext, nameBaseAllocation, nameAllocDepth)
		if tc.metaIDs[nameBaseAllocation] == 0 || tc.metaIDs[nameAllocDepth] == 0 {
			t.Fatalf("meta ids %v", tc.metaIDs)
		}
		rep := mustOK(t)(tc.do(Request{Type: nbdwire.CmdRead, Cookie: 1, Offset: 32 << 10, Length: 512 << 10}, nil))
		var types []uint16
		for _, ch := range rep.chunks {
			types = append(types, ch.typ)
		}
		if len(types) != 2 || types[0] != nbdwire.ChunkOffsetData || types[1] != nbdwire.ChunkOffsetHole {
			t.Errorf("ext=%v sparse read chunks %v", ext, types)
		}
		d, err := rep.readData(32<<10, 512<<10)
		if err != nil || !bytes.Equal(d, be.data[32<<10:544<<10]) {
			t.Fatalf("sparse read data wrong: %v", err)
		}
		// DF: one data chunk.
		rep = mustOK(t)(tc.do(Request{Type: nbdwire.CmdRead, Flags: nbdwire.CmdFlagDF, Cookie: 2, Offset: 32 << 10, Length: 512 << 10}, nil))
		if len(rep.chunks) != 1 || rep.chunks[0].typ != nbdwire.ChunkOffsetData {
			t.Errorf("DF read: %d chunks", len(rep.chunks))
		}

		rep = mustOK(t)(tc.do(Request{Type: nbdwire.CmdBlockStatus, Cookie: 3, Offset: 32 << 10, Length: 1<<20 - 32<<10}, nil))
		got := map[uint32][][2]uint64{}
		for _, ch := range rep.chunks {
			id := binary.BigEndian.Uint32(ch.payload)
			p := ch.payload[4:]
			if ext {
				if ch.typ != nbdwire.ChunkBlockStatusExt || binary.BigEndian.Uint32(p) != uint32(len(p)-4)/16 {
					t.Fatalf("ext block status chunk %d", ch.typ)
				}
				for p = p[4:]; len(p) > 0; p = p[16:] {
					got[id] = append(got[id], [2]uint64{binary.BigEndian.Uint64(p), binary.BigEndian.Uint64(p[8:])})
				}
			} else {
				if ch.typ != nbdwire.ChunkBlockStatus {
					t.Fatalf("block status chunk %d", ch.typ)
				}
				for ; len(p) > 0; p = p[8:] {
					got[id] = append(got[id], [2]uint64{uint64(binary.BigEndian.Uint32(p)), uint64(binary.BigEndian.Uint32(p[4:]))})
				}
			}
		}
		wantAlloc := [][2]uint64{{96 << 10, 0}, {64 << 10, nbdwire.StateZero}, {1<<20 - 192<<10, nbdwire.StateHole | nbdwire.StateZero}}
		wantDepth := [][2]uint64{{32 << 10, 1}, {64 << 10, 2}, {64 << 10, 1}, {1<<20 - 192<<10, 0}}
		if a, b := got[tc.metaIDs[nameBaseAllocation]], got[tc.metaIDs[nameAllocDepth]]; !equalPairs(a, wantAlloc) || !equalPairs(b, wantDepth) {
			t.Errorf("ext=%v block status\nalloc %v want %v\ndepth %v want %v", ext, a, wantAlloc, b, wantDepth)
		}
		rep = mustOK(t)(tc.do(Request{Type: nbdwire.CmdBlockStatus, Flags: nbdwire.CmdFlagReqOne, Cookie: 4, Offset: 0, Length: 1 << 20}, nil))
		for _, ch := range rep.chunks {
			if n := len(ch.payload); (ext && n != 8+16) || (!ext && n != 4+8) {
				t.Errorf("REQ_ONE reply payload %d bytes", n)
			}
		}
	}
}

func equalPairs(a, b [][2]uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// Many clients at once, pipelined, against one backend (multi-conn).
func TestConcurrentClients(t *testing.T) {
	be := newMem(4 << 20)
	_, sock, _ := startServer(t, Export{Name: "disk", Backend: be})
	var wg sync.WaitGroup
	for c := 0; c < 4; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tc := dial(t, sock)
			if err := tc.handshake("disk", c%2 == 0, c == 3); err != nil {
				t.Error(err)
				return
			}
			base := uint64(c) << 20
			p := bytes.Repeat([]byte{byte(c + 1)}, 4096)
			for i := 0; i < 64; i++ {
				tc.send(Request{Type: nbdwire.CmdWrite, Cookie: uint64(i), Offset: base + uint64(i)*4096, Length: 4096}, p)
			}
			for i := 0; i < 64; i++ {
				if rep, err := tc.recv(); err != nil || rep.errno != 0 {
					t.Errorf("write reply: %v", err)
					return
				}
			}
			for i := 0; i < 64; i++ {
				tc.send(Request{Type: nbdwire.CmdRead, Cookie: uint64(i), Offset: base + uint64(i)*4096, Length: 4096}, nil)
			}
			for i := 0; i < 64; i++ {
				rep, err := tc.recv()
				if err != nil || rep.errno != 0 {
					t.Errorf("read reply: %v", err)
					return
				}
				d, err := rep.readData(base+rep.cookie*4096, 4096)
				if err != nil || !bytes.Equal(d, p) {
					t.Errorf("client %d read %d: %v", c, rep.cookie, err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// ServeConn on a net.Pipe, stopped by its context.
func TestServeConnContext(t *testing.T) {
	be := newMem(1 << 20)
	s := &Server{Export: Export{Name: "disk", Backend: be}}
	a, b := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.ServeConn(ctx, a) }()
	tc := &testClient{c: b, reads: map[uint64]uint64{}, metaIDs: map[string]uint32{}}
	tc.br = bufioReader(b)
	if err := tc.handshake("", false, false); err != nil {
		t.Fatal(err)
	}
	mustOK(t)(tc.do(Request{Type: nbdwire.CmdFlush, Cookie: 1}, nil))
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("ServeConn after cancel: %v", err)
	}
}

// WRITE_ZEROES on a backend with neither ZeroWriter nor Discarder:
// zeros are written, and FAST_ZERO is refused with ENOTSUP up front.
func TestWriteZeroesFallback(t *testing.T) {
	be := newMem(1 << 20)
	for i := range be.data {
		be.data[i] = 0xff
	}
	_, sock, _ := startServer(t, Export{Name: "disk", Backend: be})
	tc := connected(t, sock, true, false)
	rep, err := tc.do(Request{Type: nbdwire.CmdWriteZeroes, Flags: nbdwire.CmdFlagFastZero, Cookie: 1, Offset: 4096, Length: 8192}, nil)
	if err != nil || rep.errno != nbdwire.ErrnoNotSup {
		t.Fatalf("FAST_ZERO: %+v %v", rep, err)
	}
	mustOK(t)(tc.do(Request{Type: nbdwire.CmdWriteZeroes, Flags: nbdwire.CmdFlagFUA, Cookie: 2, Offset: 4096, Length: 1<<20 - 4096}, nil))
	rep = mustOK(t)(tc.do(Request{Type: nbdwire.CmdRead, Cookie: 3, Offset: 0, Length: 1 << 20}, nil))
	d, _ := rep.readData(0, 1<<20)
	for i, b := range d {
		want := byte(0)
		if i < 4096 {
			want = 0xff
		}
		if b != want {
			t.Fatalf("byte %d = %#x after WRITE_ZEROES, want %#x", i, b, want)
		}
	}
	be.mu.RLock()
	defer be.mu.RUnlock()
	if be.flushes == 0 {
		t.Error("FUA did not flush")
	}
}

// slowThenGate: the read at offset 0 is slow (a page-cache miss), the
// read at 8192 blocks until released.
type slowThenGate struct {
	*memBackend
	gate    chan struct{}
	entered chan struct{}
}

func (g *slowThenGate) ReadAt(p []byte, off int64) (int, error) {
	switch off {
	case 0:
		time.Sleep(2 * slowInline)
	case 8192:
		g.entered <- struct{}{}
		<-g.gate
	}
	return g.memBackend.ReadAt(p, off)
}

// After a slow read run by the reader, reads go to the workers, so a
// read that blocks no longer holds up the connection.
func TestSlowInlineReadHandsOffToWorkers(t *testing.T) {
	g := &slowThenGate{memBackend: newMem(1 << 20), gate: make(chan struct{}), entered: make(chan struct{}, 1)}
	_, sock, _ := startServer(t, Export{Name: "disk", Backend: g})
	tc := connected(t, sock, false, false)
	mustOK(t)(tc.do(Request{Type: nbdwire.CmdRead, Cookie: 1, Offset: 0, Length: 512}, nil))
	tc.send(Request{Type: nbdwire.CmdRead, Cookie: 2, Offset: 8192, Length: 512}, nil)
	<-g.entered
	if rep := mustOK(t)(tc.do(Request{Type: nbdwire.CmdRead, Cookie: 3, Offset: 4096, Length: 512}, nil)); rep.cookie != 3 {
		t.Fatalf("reply for cookie %d, want 3", rep.cookie)
	}
	close(g.gate)
	if rep := mustOK(t)(tc.recv()); rep.cookie != 2 {
		t.Fatalf("reply for cookie %d, want 2", rep.cookie)
	}
}

// Extended headers specifics (NBD extension-ext-header, as qemu 8.2
// implements it).
func TestExtendedHeaders(t *testing.T) {
	be := layered{newMem(1 << 20)}
	_, sock, _ := startServer(t, Export{Name: "disk", Backend: be})
	t.Run("block status length is a hint", func(t *testing.T) {
		tc := connected(t, sock, true, true, nameBaseAllocation)
		rep := mustOK(t)(tc.do(Request{Type: nbdwire.CmdBlockStatus, Cookie: 1, Offset: 1<<20 - 4096, Length: 1 << 40}, nil))
		p := rep.chunks[0].payload
		if rep.chunks[0].typ != nbdwire.ChunkBlockStatusExt || binary.BigEndian.Uint32(p[4:]) != 1 ||
			binary.BigEndian.Uint64(p[8:]) != 4096 || binary.BigEndian.Uint64(p[16:]) != nbdwire.StateHole|nbdwire.StateZero {
			t.Fatalf("chunk %d payload % x", rep.chunks[0].typ, p)
		}
		if rep.chunks[0].offset != 1<<20-4096 {
			t.Errorf("reply offset %d", rep.chunks[0].offset)
		}
		// A 64-bit write payload above the maximum loses the framing.
		tc.send(Request{Type: nbdwire.CmdWrite, Cookie: 2, Length: 1 << 33}, nil)
		expectClosed(t, tc)
	})
	t.Run("options refused after EXTENDED_HEADERS", func(t *testing.T) {
		tc := dial(t, sock)
		tc.greet(nbdwire.ClientFlagFixedNewstyle | nbdwire.ClientFlagNoZeroes)
		for _, st := range []struct{ opt, want uint32 }{
			{nbdwire.OptExtendedHeaders, nbdwire.RepAck}, {nbdwire.OptExtendedHeaders, nbdwire.RepErrInvalid}, {nbdwire.OptStructuredReply, nbdwire.RepErrInvalid},
		} {
			if typ, err := tc.simpleOpt(st.opt); err != nil || typ != st.want {
				t.Fatalf("option %d: %#x %v, want %#x", st.opt, typ, err, st.want)
			}
		}
		tc.sendOpt(nbdwire.OptExportName, []byte("disk"))
		expectClosed(t, tc)
	})
}

// InlineWrites: a small write runs on the reader, so a request sent
// behind it is read only once it returns (the trade the option makes);
// a write with FUA still goes to the workers and does not hold the
// reader.
func TestInlineWrites(t *testing.T) {
	g := &gateBackend{memBackend: newMem(1 << 20), gate: make(chan struct{}), entered: make(chan struct{}, 1)}
	_, sock, _ := startServer(t, Export{Name: "disk", Backend: g, InlineWrites: true})
	tc := connected(t, sock, false, false)
	tc.send(Request{Type: nbdwire.CmdWrite, Cookie: 1, Offset: 0, Length: 5}, []byte("hello"))
	<-g.entered
	tc.send(Request{Type: nbdwire.CmdRead, Cookie: 2, Offset: 4096, Length: 512}, nil)
	tc.c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if _, err := tc.br.Peek(1); err == nil {
		t.Fatal("a reply came while the inline write was blocked")
	}
	tc.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	close(g.gate)
	for _, want := range []uint64{1, 2} {
		if rep := mustOK(t)(tc.recv()); rep.cookie != want {
			t.Fatalf("reply for cookie %d, want %d", rep.cookie, want)
		}
	}
	// The slow write turned inlining off for a while; the data is there.
	rep := mustOK(t)(tc.do(Request{Type: nbdwire.CmdRead, Cookie: 3, Offset: 0, Length: 5}, nil))
	if string(rep.data) != "hello" {
		t.Fatalf("read back %q", rep.data)
	}

	// A fresh connection: a write with FUA goes to the workers, so it
	// blocking does not stop a read sent behind it.
	g2 := &gateBackend{memBackend: newMem(1 << 20), gate: make(chan struct{}), entered: make(chan struct{}, 1)}
	_, sock2, _ := startServer(t, Export{Name: "disk", Backend: g2, InlineWrites: true})
	tc2 := connected(t, sock2, false, false)
	tc2.send(Request{Type: nbdwire.CmdWrite, Flags: nbdwire.CmdFlagFUA, Cookie: 1, Offset: 0, Length: 5}, []byte("hello"))
	<-g2.entered
	if rep := mustOK(t)(tc2.do(Request{Type: nbdwire.CmdRead, Cookie: 2, Offset: 4096, Length: 512}, nil)); rep.cookie != 2 {
		t.Fatalf("first reply is for cookie %d, want 2", rep.cookie)
	}
	close(g2.gate)
	if rep := mustOK(t)(tc2.recv()); rep.cookie != 1 {
		t.Fatalf("reply for cookie %d, want 1", rep.cookie)
	}
}

// TestReaderReadsWhileWriterWaits: a client that sends its requests
// before it reads any reply gets them all read, even while the writer
// waits for that client to read (its big read replies overfill the
// socket) and the reader has an inline read's reply of its own to
// queue. A reader that waited for the writer role there would stop
// reading, and the client's writes behind it could never be sent.
func TestReaderReadsWhileWriterWaits(t *testing.T) {
	_, sock, _ := startServer(t, Export{Name: "disk", Backend: newMem(32 << 20)})
	tc := connected(t, sock, false, false)
	const bigReads, writes = 16, 8 // 16 MiB of replies: more than the socket holds
	payload := make([]byte, 1<<20)
	sent := make(chan error, 1)
	go func() {
		for i := range bigReads {
			if err := tc.send(Request{Type: nbdwire.CmdRead, Cookie: uint64(1 + i), Offset: uint64(i) << 20, Length: 1 << 20}, nil); err != nil {
				sent <- err
				return
			}
		}
		time.Sleep(200 * time.Millisecond) // the workers' replies fill the socket
		if err := tc.send(Request{Type: nbdwire.CmdRead, Cookie: 100, Offset: 0, Length: 96 << 10}, nil); err != nil {
			sent <- err
			return
		}
		for i := range writes {
			if err := tc.send(Request{Type: nbdwire.CmdWrite, Cookie: uint64(200 + i), Offset: uint64(16+i) << 20, Length: 1 << 20}, payload); err != nil {
				sent <- err
				return
			}
		}
		sent <- nil
	}()
	select {
	case err := <-sent:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		tc.c.Close()
		t.Fatal("the server stopped reading requests while its replies waited for the client")
	}
	for range bigReads + 1 + writes {
		mustOK(t)(tc.recv())
	}
}
