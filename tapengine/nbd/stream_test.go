package nbd

import (
	"bytes"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/internal/nbdwire"
	"github.com/blktap-go/blktap/internal/oracle"
)

// TestStreamedRequests: READ and WRITE between MaxPayload and MaxStreamed
// (64 MiB, what nbdkit serves to clients told no block size) are served,
// in every reply mode, without buffering the request whole; a refused one
// keeps the connection in frame.
func TestStreamedRequests(t *testing.T) {
	const size = MaxStreamed + 8<<20
	be, _ := newFileBackend(t, size)
	_, sock, _ := startServer(t, Export{Name: "disk", Backend: be})
	payload := make([]byte, MaxStreamed)
	for i := range payload {
		payload[i] = byte(i/4096) ^ byte(i)
	}
	for _, mode := range []struct {
		name            string
		structured, ext bool
	}{{"export-name", false, false}, {"structured", true, false}, {"extended", true, true}} {
		t.Run(mode.name, func(t *testing.T) {
			var tc *testClient
			if mode.name == "export-name" {
				tc = dial(t, sock)
				if err := tc.greet(nbdwire.ClientFlagFixedNewstyle | nbdwire.ClientFlagNoZeroes); err != nil {
					t.Fatal(err)
				}
				if err := tc.sendOpt(nbdwire.OptExportName, []byte("disk")); err != nil {
					t.Fatal(err)
				}
				if _, err := tc.readN(10); err != nil {
					t.Fatal(err)
				}
			} else {
				tc = connected(t, sock, mode.structured, mode.ext)
			}
			const off = 4096 + 512
			n := uint64(MaxStreamed)
			if raceEnabled {
				// Still above MaxPayload, so streamed, and over a chunk
				// boundary: the path under test, at 40% fewer bytes.
				n = MaxPayload + streamChunk + 8<<10
			}
			if mode.ext {
				n -= 4096 // not a multiple of the part size
			}
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			hdr, err := nbdwire.AppendRequest(nil, Request{Type: nbdwire.CmdWrite, Cookie: 1, Offset: off, Length: n}, tc.ext)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := tc.c.Write(hdr); err != nil {
				t.Fatal(err)
			}
			if _, err := tc.c.Write(payload[:n]); err != nil {
				t.Fatal(err)
			}
			rep, err := tc.recv()
			if err != nil || rep.errno != 0 {
				t.Fatalf("%d-byte write: errno %v, %v", n, rep, err)
			}
			runtime.ReadMemStats(&after)
			if grew := after.TotalAlloc - before.TotalAlloc; grew > 16<<20 {
				t.Errorf("serving a %d-byte write allocated %d bytes: buffered, not streamed", n, grew)
			}
			rep = mustOK(t)(tc.do(Request{Type: nbdwire.CmdRead, Cookie: 2, Offset: off, Length: n}, nil))
			got, err := rep.readData(off, n)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, payload[:n]) {
				t.Fatalf("%d-byte read returned other bytes than the write", n)
			}
			// Refused whole (past the end); the connection goes on.
			hdr, _ = nbdwire.AppendRequest(nil, Request{Type: nbdwire.CmdWrite, Cookie: 3, Offset: size - 4096, Length: n}, tc.ext)
			tc.c.Write(hdr)
			tc.c.Write(payload[:n])
			if rep, err := tc.recv(); err != nil || rep.errno != nbdwire.ErrnoNoSpace {
				t.Fatalf("%d-byte write past the end: %+v, %v", n, rep, err)
			}
			rep = mustOK(t)(tc.do(Request{Type: nbdwire.CmdRead, Cookie: 4, Offset: off, Length: 4096}, nil))
			if got, err := rep.readData(off, 4096); err != nil || !bytes.Equal(got, payload[:4096]) {
				t.Fatalf("read after a refused %d-byte write: %v", n, err)
			}
		})
	}
}

// TestStreamedWithNbdsh: libnbd (strict mode off, so it sends what the
// server's advertised maximum would forbid) writes and reads 64 MiB in one
// request each.
func TestStreamedWithNbdsh(t *testing.T) {
	nbdsh := oracle.Require(t, "nbdsh")
	be, _ := newFileBackend(t, MaxStreamed+1<<20)
	_, _, uri := startServer(t, Export{Name: "disk", Backend: be})
	script := `
h.set_strict_mode(0)
n = 64 * 1024 * 1024
buf = bytes(range(256)) * (n // 256)
h.pwrite(buf, 512)
assert h.pread(n, 512) == buf
print("ok")
`
	cmd := exec.Command(nbdsh, "-u", uri, "-c", script)
	// nbdsh is a Python program; the system's python3 has its module,
	// a python3 earlier on PATH may not.
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:"+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "ok") {
		t.Fatalf("nbdsh: %v\n%s", err, out)
	}
}
