package frontend

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/nbd"
	"github.com/blktap-go/blktap/tapengine/ring"
)

// oldClient is the least an NBD client can be: fixed newstyle,
// NBD_OPT_EXPORT_NAME, simple replies only. It is written from the
// protocol document, so it shares no code with the server under test.
type oldClient struct {
	c    net.Conn
	br   *bufio.Reader
	size uint64
}

func dialOld(t *testing.T, sock, name string) *oldClient {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(15 * time.Second))
	oc := &oldClient{c: c, br: bufio.NewReaderSize(c, 1<<20)}
	var greet [18]byte
	if _, err := io.ReadFull(oc.br, greet[:]); err != nil || string(greet[:16]) != "NBDMAGICIHAVEOPT" {
		t.Fatalf("greeting %q: %v", greet, err)
	}
	// FIXED_NEWSTYLE | NO_ZEROES, then the export name.
	msg := binary.BigEndian.AppendUint32(nil, 3)
	msg = append(msg, "IHAVEOPT"...)
	msg = binary.BigEndian.AppendUint32(msg, 1)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(name)))
	msg = append(msg, name...)
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	var info [10]byte
	if _, err := io.ReadFull(oc.br, info[:]); err != nil {
		t.Fatalf("export info: %v", err)
	}
	oc.size = binary.BigEndian.Uint64(info[:])
	return oc
}

// request appends one request header (and payload, if any) to b.
func request(b []byte, typ uint16, cookie, off uint64, n uint32, payload []byte) []byte {
	b = binary.BigEndian.AppendUint32(b, 0x25609513)
	b = binary.BigEndian.AppendUint16(b, 0)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, n)
	return append(b, payload...)
}

// reply reads one simple reply and, for a successful read, n bytes.
func (oc *oldClient) reply(n int) (cookie uint64, errno uint32, data []byte, err error) {
	var h [16]byte
	if _, err := io.ReadFull(oc.br, h[:]); err != nil {
		return 0, 0, nil, err
	}
	if binary.BigEndian.Uint32(h[:]) != 0x67446698 {
		return 0, 0, nil, errors.New("bad reply magic")
	}
	errno, cookie = binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
	if errno == 0 && n > 0 {
		data = make([]byte, n)
		_, err = io.ReadFull(oc.br, data)
	}
	return cookie, errno, data, err
}

// TestRefusedWritesDoNotWedge: a guest view that refuses a burst of
// pipelined writes (read-only export, or past the end) answers every one,
// serves reads on a new connection, and shuts down. It once lent each
// refused write a ring buffer for its payload and held the error replies
// back, so after a ring's worth of them the reader waited for a buffer
// only its own held replies would free: every client hung, and so did
// shutdown.
func TestRefusedWritesDoNotWedge(t *testing.T) {
	const size = 8 << 20
	const burst = 400
	r := newRigOpts(t, Options{Protocol: blkif.X86_64}, size, ring.Options{})
	pattern := bytes.Repeat([]byte("wedge?"), 4096/6+1)[:4096]
	if _, err := r.img.WriteAt(pattern, 4096); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name     string
		readOnly bool
		off      uint64
		errno    uint32
	}{
		{"read-only", true, 0, 1},         // EPERM
		{"past-the-end", false, size, 28}, // ENOSPC
	} {
		t.Run(c.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "g.sock")
			ln, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			srv := &nbd.Server{Export: nbd.Export{Name: "g", Backend: r.f, RoundTrip: true, ReadOnly: c.readOnly}}
			done := make(chan error, 1)
			go func() { done <- srv.Serve(context.Background(), ln) }()

			oc := dialOld(t, sock, "g")
			// The whole burst in one write: small writes, so that many
			// more than a ring's worth sit in the server's read buffer.
			var b []byte
			payload := bytes.Repeat([]byte{0xee}, 512)
			for i := range uint64(burst) {
				b = request(b, 1, i, c.off+i%8*512, 512, payload)
			}
			sent := make(chan error, 1)
			go func() {
				_, err := oc.c.Write(b)
				sent <- err
			}()
			for range burst {
				_, errno, _, err := oc.reply(0)
				if err != nil {
					t.Fatalf("reply to a refused write: %v", err)
				}
				if errno != c.errno {
					t.Fatalf("refused write answered %d, want %d", errno, c.errno)
				}
			}
			if err := <-sent; err != nil {
				t.Fatal(err)
			}
			// A new client reads, while the first is still connected.
			nc := dialOld(t, sock, "g")
			if _, err := nc.c.Write(request(nil, 0, 7, 4096, 4096, nil)); err != nil {
				t.Fatal(err)
			}
			if _, errno, data, err := nc.reply(4096); err != nil || errno != 0 || !bytes.Equal(data, pattern) {
				t.Fatalf("read on a new connection: errno %d, %v", errno, err)
			}
			closed := make(chan error, 1)
			go func() { closed <- srv.Close() }()
			select {
			case <-closed:
			case <-time.After(20 * time.Second):
				t.Fatal("the export did not shut down")
			}
			<-done
		})
	}
	if got := r.stats.Writes.Load(); got != 0 {
		t.Errorf("%d refused writes reached the ring", got)
	}
}

// TestGuestView64MiB: a client that negotiated no block size writes and
// reads 64 MiB in one request each through the guest view (NBD ->
// frontend -> ring -> image). Under -race the request is smaller but still
// above nbd.MaxPayload, so it takes the same streamed path.
func TestGuestView64MiB(t *testing.T) {
	const size = 72 << 20
	n := 64 << 20
	if raceEnabled {
		n = nbd.MaxPayload + 4<<20 + 8<<10
	}
	// Each step gets its own deadline: one set at dial for the whole test
	// was missed under -race on a loaded machine. A stuck step still fails.
	const step = 60 * time.Second
	r := newRigOpts(t, Options{Protocol: blkif.X86_64, RingOrder: 2, MaxIndirectSegments: 256}, size, ring.Options{MaxIndirectSegments: 256})
	uri := serveNBD(t, r.f)
	sock := uri[strings.Index(uri, "socket=")+len("socket="):]
	oc := dialOld(t, sock, "guest")
	payload := make([]byte, n)
	for i := range payload {
		payload[i] = byte(i>>9) ^ byte(i)
	}
	oc.c.SetDeadline(time.Now().Add(step))
	if _, err := oc.c.Write(request(nil, 1, 1, 4096, uint32(n), payload)); err != nil {
		t.Fatal(err)
	}
	if _, errno, _, err := oc.reply(0); err != nil || errno != 0 {
		t.Fatalf("%d-byte write: errno %d, %v", n, errno, err)
	}
	oc.c.SetDeadline(time.Now().Add(step))
	if _, err := oc.c.Write(request(nil, 0, 2, 4096, uint32(n), nil)); err != nil {
		t.Fatal(err)
	}
	_, errno, data, err := oc.reply(n)
	if err != nil || errno != 0 || !bytes.Equal(data, payload) {
		t.Fatalf("%d-byte read: errno %d, %v, same bytes %v", n, errno, err, bytes.Equal(data, payload))
	}
	got := make([]byte, n)
	if _, err := r.img.ReadAt(got, 4096); err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("the image does not hold the %d-byte write: %v", n, err)
	}
}

// TestGuestViewCloseWithSilentBackend: the guest view's Close waits for
// the requests its connections have on the ring; when no worker answers
// them (stopped, dead, paused), closing the frontend must fail them so
// the export (and the daemon's shutdown, which relies on this) ends.
func TestGuestViewCloseWithSilentBackend(t *testing.T) {
	const size = 4 << 20
	const reads = 8
	f, err := New(Options{Protocol: blkif.X86_64})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := attachDup(t, f)
	defer tr.Close()
	consumed := swallow(t, tr, reads)
	if err := f.Connect(size/512, 512, false); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "g.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &nbd.Server{Export: nbd.Export{Name: "g", Backend: f, RoundTrip: true}}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(context.Background(), ln) }()
	oc := dialOld(t, sock, "g")
	var b []byte
	for i := range uint64(reads) {
		b = request(b, 0, i, i*4096, 4096, nil)
	}
	if _, err := oc.c.Write(b); err != nil {
		t.Fatal(err)
	}
	<-consumed
	closed := make(chan error, 1)
	go func() { closed <- srv.Close() }()
	select {
	case <-closed:
		t.Fatal("Close returned with reads unanswered on the ring")
	case <-time.After(300 * time.Millisecond):
	}
	f.CloseWithError(errors.New("test: no worker"))
	select {
	case <-closed:
	case <-time.After(20 * time.Second):
		t.Fatal("the export did not shut down after the frontend closed")
	}
	<-served
	for range reads {
		if _, errno, _, err := oc.reply(4096); err == nil && errno == 0 {
			t.Fatal("a read nobody answered got data")
		} else if err != nil {
			break // the server may hang up instead of answering
		}
	}
}
