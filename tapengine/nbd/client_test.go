package nbd

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/nbdwire"
	"github.com/blktap-go/blktap/internal/testutil"
)

// testClient is a minimal NBD client for byte-level tests: it speaks the
// protocol from the client's side, written from proto.md, independently
// of the server's code paths (only the constants are shared).
type testClient struct {
	c          net.Conn
	br         *bufio.Reader
	structured bool
	ext        bool
	size       uint64
	tflags     uint16
	metaIDs    map[string]uint32
	reads      map[uint64]uint64 // cookie -> length, for simple read replies
}

type chunk struct {
	flags, typ uint16
	offset     uint64 // extended reply header offset
	payload    []byte
}

type reply struct {
	cookie uint64
	errno  uint32
	data   []byte // simple read payload
	chunks []chunk
}

func dial(t testing.TB, sock string) *testClient {
	t.Helper()
	c := testutil.Dial(t, "unix", sock, 30*time.Second)
	return &testClient{c: c, br: bufio.NewReader(c), reads: map[uint64]uint64{}, metaIDs: map[string]uint32{}}
}

func (tc *testClient) readN(n int) ([]byte, error) {
	b := make([]byte, n)
	_, err := io.ReadFull(tc.br, b)
	return b, err
}

// greet reads the server greeting and sends client flags.
func (tc *testClient) greet(flags uint32) error {
	b, err := tc.readN(18)
	if err != nil {
		return err
	}
	if binary.BigEndian.Uint64(b) != nbdwire.MagicNBD || binary.BigEndian.Uint64(b[8:]) != nbdwire.MagicOption {
		return fmt.Errorf("bad greeting % x", b)
	}
	return binary.Write(tc.c, binary.BigEndian, flags)
}

func (tc *testClient) sendOpt(opt uint32, data []byte) error {
	b := binary.BigEndian.AppendUint64(nil, nbdwire.MagicOption)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	_, err := tc.c.Write(append(b, data...))
	return err
}

// optReply reads one option reply.
func (tc *testClient) optReply() (opt, typ uint32, data []byte, err error) {
	h, err := tc.readN(20)
	if err != nil {
		return 0, 0, nil, err
	}
	if m := binary.BigEndian.Uint64(h); m != nbdwire.MagicOptionReply {
		return 0, 0, nil, fmt.Errorf("bad option reply magic %#x", m)
	}
	opt, typ = binary.BigEndian.Uint32(h[8:]), binary.BigEndian.Uint32(h[12:])
	data, err = tc.readN(int(binary.BigEndian.Uint32(h[16:])))
	return opt, typ, data, err
}

// simpleOpt sends an option with no data and expects one ACK or error.
func (tc *testClient) simpleOpt(opt uint32) (uint32, error) {
	if err := tc.sendOpt(opt, nil); err != nil {
		return 0, err
	}
	_, typ, _, err := tc.optReply()
	return typ, err
}

// infoData is the data of NBD_OPT_INFO and NBD_OPT_GO: the export name and
// the information requests.
func infoData(name string, infos ...uint16) []byte {
	return nbdwire.AppendInfoQuery(nil, name, infos...)
}

// untilAck reads option replies up to the ACK that ends them, handing
// each other reply to each (nil: ignore them); each's error stops it.
func (tc *testClient) untilAck(each func(typ uint32, data []byte) error) error {
	for {
		_, typ, data, err := tc.optReply()
		if err != nil {
			return err
		}
		if typ == nbdwire.RepAck {
			return nil
		}
		if each != nil {
			if err := each(typ, data); err != nil {
				return err
			}
		}
	}
}

// handshake negotiates as asked and GOes to export name.
func (tc *testClient) handshake(name string, structured, ext bool, meta ...string) error {
	if err := tc.greet(nbdwire.ClientFlagFixedNewstyle | nbdwire.ClientFlagNoZeroes); err != nil {
		return err
	}
	if ext {
		if typ, err := tc.simpleOpt(nbdwire.OptExtendedHeaders); err != nil || typ != nbdwire.RepAck {
			return fmt.Errorf("EXTENDED_HEADERS: %#x %v", typ, err)
		}
		tc.ext, tc.structured = true, true
	} else if structured {
		if typ, err := tc.simpleOpt(nbdwire.OptStructuredReply); err != nil || typ != nbdwire.RepAck {
			return fmt.Errorf("STRUCTURED_REPLY: %#x %v", typ, err)
		}
		tc.structured = true
	}
	if len(meta) > 0 {
		if err := tc.sendOpt(nbdwire.OptSetMetaContext, nbdwire.AppendMetaContextQuery(nil, name, meta...)); err != nil {
			return err
		}
		err := tc.untilAck(func(typ uint32, data []byte) error {
			if typ != nbdwire.RepMetaContext {
				return fmt.Errorf("SET_META_CONTEXT reply %#x %q", typ, data)
			}
			tc.metaIDs[string(data[4:])] = binary.BigEndian.Uint32(data)
			return nil
		})
		if err != nil {
			return err
		}
	}
	if err := tc.sendOpt(nbdwire.OptGo, infoData(name)); err != nil {
		return err
	}
	for {
		_, typ, data, err := tc.optReply()
		if err != nil {
			return err
		}
		switch typ {
		case nbdwire.RepAck:
			return nil
		case nbdwire.RepInfo:
			if binary.BigEndian.Uint16(data) == nbdwire.InfoExport {
				tc.size = binary.BigEndian.Uint64(data[2:])
				tc.tflags = binary.BigEndian.Uint16(data[10:])
			}
		default:
			return fmt.Errorf("GO reply %#x %q", typ, data)
		}
	}
}

func (tc *testClient) send(r Request, payload []byte) error {
	b, err := nbdwire.AppendRequest(nil, r, tc.ext)
	if err != nil {
		return err
	}
	if r.Type == nbdwire.CmdRead {
		tc.reads[r.Cookie] = r.Length
	}
	_, err = tc.c.Write(append(b, payload...))
	return err
}

// recv reads one complete reply (every chunk up to DONE).
func (tc *testClient) recv() (*reply, error) {
	rep := &reply{}
	for {
		m, err := tc.readN(4)
		if err != nil {
			return nil, err
		}
		switch binary.BigEndian.Uint32(m) {
		case nbdwire.MagicSimpleReply:
			b, err := tc.readN(12)
			if err != nil {
				return nil, err
			}
			rep.errno = binary.BigEndian.Uint32(b)
			rep.cookie = binary.BigEndian.Uint64(b[4:])
			if n, ok := tc.reads[rep.cookie]; ok && rep.errno == 0 {
				if rep.data, err = tc.readN(int(n)); err != nil {
					return nil, err
				}
			}
			delete(tc.reads, rep.cookie)
			return rep, nil
		case nbdwire.MagicChunkReply:
			b, err := tc.readN(16)
			if err != nil {
				return nil, err
			}
			ch := chunk{flags: binary.BigEndian.Uint16(b), typ: binary.BigEndian.Uint16(b[2:])}
			rep.cookie = binary.BigEndian.Uint64(b[4:])
			if ch.payload, err = tc.readN(int(binary.BigEndian.Uint32(b[12:]))); err != nil {
				return nil, err
			}
			if err := rep.add(ch); err != nil {
				return nil, err
			}
		case nbdwire.MagicExtReply:
			b, err := tc.readN(28)
			if err != nil {
				return nil, err
			}
			ch := chunk{flags: binary.BigEndian.Uint16(b), typ: binary.BigEndian.Uint16(b[2:])}
			rep.cookie = binary.BigEndian.Uint64(b[4:])
			ch.offset = binary.BigEndian.Uint64(b[12:])
			n := binary.BigEndian.Uint64(b[20:])
			if n > 64<<20 {
				return nil, fmt.Errorf("absurd payload %d", n)
			}
			if ch.payload, err = tc.readN(int(n)); err != nil {
				return nil, err
			}
			if err := rep.add(ch); err != nil {
				return nil, err
			}
		default:
			return nil, fmt.Errorf("bad reply magic % x", m)
		}
		if last := rep.chunks[len(rep.chunks)-1]; last.flags&nbdwire.ChunkFlagDone != 0 {
			delete(tc.reads, rep.cookie)
			return rep, nil
		}
	}
}

func (rep *reply) add(ch chunk) error {
	if ch.typ == nbdwire.ChunkError || ch.typ == nbdwire.ChunkErrorOffset {
		if len(ch.payload) < 6 {
			return fmt.Errorf("short error chunk")
		}
		rep.errno = binary.BigEndian.Uint32(ch.payload)
	}
	rep.chunks = append(rep.chunks, ch)
	return nil
}

// readData assembles a structured read's chunks into length bytes.
func (rep *reply) readData(off, length uint64) ([]byte, error) {
	if rep.chunks == nil {
		return rep.data, nil
	}
	out := make([]byte, length)
	var covered uint64
	for _, ch := range rep.chunks {
		switch ch.typ {
		case nbdwire.ChunkOffsetData:
			o := binary.BigEndian.Uint64(ch.payload) - off
			covered += uint64(copy(out[o:], ch.payload[8:]))
		case nbdwire.ChunkOffsetHole:
			covered += uint64(binary.BigEndian.Uint32(ch.payload[8:]))
		case nbdwire.ChunkNone:
		default:
			return nil, fmt.Errorf("chunk type %d in a read", ch.typ)
		}
	}
	if covered != length {
		return nil, fmt.Errorf("chunks cover %d of %d bytes", covered, length)
	}
	return out, nil
}

// do sends one request and waits for its reply.
func (tc *testClient) do(r Request, payload []byte) (*reply, error) {
	if err := tc.send(r, payload); err != nil {
		return nil, err
	}
	return tc.recv()
}

func bufioReader(r io.Reader) *bufio.Reader { return bufio.NewReader(r) }
