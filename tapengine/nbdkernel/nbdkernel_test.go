package nbdkernel

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/nbdwire"
	"github.com/blktap-go/blktap/internal/oracle"
	"github.com/blktap-go/blktap/internal/testutil"
	"github.com/blktap-go/blktap/tapengine/nbd"
)

// memDisk is an in-memory nbd.Backend.
type memDisk struct {
	mu   sync.RWMutex
	data []byte
}

func (m *memDisk) Size() int64 { return int64(len(m.data)) }
func (m *memDisk) ReadAt(p []byte, off int64) (int, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if off < 0 || off+int64(len(p)) > int64(len(m.data)) {
		return 0, io.EOF
	}
	return copy(p, m.data[off:]), nil
}
func (m *memDisk) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || off+int64(len(p)) > int64(len(m.data)) {
		return 0, io.ErrShortWrite
	}
	return copy(m.data[off:], p), nil
}
func (m *memDisk) Flush() error { return nil }

// serve runs this project's NBD server on a unix socket in-process.
func serve(t *testing.T, exp nbd.Export) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	s := &nbd.Server{Export: exp}
	testutil.Serve(t, s, ln)
	return sock
}

func dialHandshake(t *testing.T, sock, export string) (net.Conn, Export, error) {
	t.Helper()
	c := testutil.Dial(t, "unix", sock, 20*time.Second)
	e, err := handshake(c, export)
	return c, e, err
}

// simpleRequest sends one request as the kernel would and reads its
// simple reply: the kernel understands nothing else, so a structured
// chunk here (magic 0x668e33ef) fails the test.
func simpleRequest(t *testing.T, c net.Conn, typ uint16, off uint64, payload []byte, readLen uint32) []byte {
	t.Helper()
	n := uint32(len(payload))
	if typ == 0 {
		n = readLen
	}
	b := binary.BigEndian.AppendUint32(nil, 0x25609513)
	b = binary.BigEndian.AppendUint16(b, 0)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, 0xc00c1e)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, n)
	if _, err := c.Write(append(b, payload...)); err != nil {
		t.Fatal(err)
	}
	var h [16]byte
	if _, err := io.ReadFull(c, h[:]); err != nil {
		t.Fatal(err)
	}
	if m := binary.BigEndian.Uint32(h[:]); m != 0x67446698 {
		t.Fatalf("reply magic %#x, want the simple reply's 0x67446698", m)
	}
	if e := binary.BigEndian.Uint32(h[4:]); e != 0 {
		t.Fatalf("reply error %d", e)
	}
	if ck := binary.BigEndian.Uint64(h[8:]); ck != 0xc00c1e {
		t.Fatalf("reply cookie %#x", ck)
	}
	if typ != 0 {
		return nil
	}
	data := make([]byte, readLen)
	if _, err := io.ReadFull(c, data); err != nil {
		t.Fatal(err)
	}
	return data
}

// The handshake against this project's server, then transmission in the
// kernel's style over the same socket.
func TestHandshakeOwnServer(t *testing.T) {
	disk := &memDisk{data: make([]byte, 3<<20+512)}
	copy(disk.data[1<<20:], "kernel")
	sock := serve(t, nbd.Export{Name: "disk", Backend: disk})
	for _, name := range []string{"disk", ""} {
		c, e, err := dialHandshake(t, sock, name)
		if err != nil {
			t.Fatalf("export %q: %v", name, err)
		}
		if e.Size != 3<<20+512 || e.Flags&nbdwire.TransHasFlags == 0 || e.ReadOnly() || e.Flags&(1<<2) == 0 {
			t.Errorf("export %q: %+v", name, e)
		}
		if e.MinBlock != 1 || e.PreferredBlock != 4096 || e.MaxPayload != nbd.MaxPayload {
			t.Errorf("block sizes %+v", e)
		}
		if bs, _ := blockSize(e); bs != 512 {
			t.Errorf("block size %d", bs)
		}
		if got := simpleRequest(t, c, 0, 1<<20, nil, 6); string(got) != "kernel" {
			t.Fatalf("read %q", got)
		}
		simpleRequest(t, c, 1, 4096, []byte("written"), 0)
		disk.mu.RLock()
		got := string(disk.data[4096:4103])
		disk.mu.RUnlock()
		if got != "written" {
			t.Fatal("write did not reach the disk")
		}
		simpleRequest(t, c, 3, 0, nil, 0) // flush
	}

	ro := serve(t, nbd.Export{Name: "ro", Backend: disk, ReadOnly: true})
	if _, e, err := dialHandshake(t, ro, "ro"); err != nil || !e.ReadOnly() {
		t.Errorf("read-only export: %+v, %v", e, err)
	}
	_, _, err := dialHandshake(t, sock, "nosuch")
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "nosuch") {
		t.Errorf("unknown export: %v", err)
	}
}

// The handshake against qemu-nbd, the peer most servers are measured by.
func TestHandshakeQemuNbd(t *testing.T) {
	qemuNbd := oracle.Require(t, "qemu-nbd")
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.raw")
	data := make([]byte, 8<<20)
	copy(data[2<<20:], "from qemu")
	if err := os.WriteFile(img, data, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, ro := range []bool{false, true} {
		sock := filepath.Join(dir, fmt.Sprintf("q-%v.sock", ro))
		args := []string{"-k", sock, "-f", "raw", "-x", "disk", "--persistent", "-e", "2"}
		if ro {
			args = append(args, "-r")
		}
		cmd := exec.Command(qemuNbd, append(args, img)...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		oracle.WaitListening(t, sock, 10*time.Second)
		c, e, err := dialHandshake(t, sock, "disk")
		if err != nil {
			t.Fatalf("qemu-nbd (ro=%v): %v\n%s", ro, err, stderr.String())
		}
		if e.Size != 8<<20 || e.ReadOnly() != ro || e.Flags&nbdwire.TransHasFlags == 0 || e.MaxPayload == 0 {
			t.Errorf("qemu-nbd ro=%v: %+v", ro, e)
		}
		// No structured replies were asked for, so qemu must not set
		// SEND_DF (bit 7): it does only once they are negotiated.
		if e.Flags&(1<<7) != 0 {
			t.Errorf("qemu-nbd advertised DF: structured replies were negotiated by mistake (%#x)", e.Flags)
		}
		if got := simpleRequest(t, c, 0, 2<<20, nil, 9); string(got) != "from qemu" {
			t.Errorf("read through qemu-nbd: %q", got)
		}
		if _, _, err := dialHandshake(t, sock, "other"); !errors.Is(err, ErrRefused) {
			t.Errorf("qemu-nbd, unknown export: %v", err)
		}
	}
}

// A server without NBD_OPT_GO gets NBD_OPT_EXPORT_NAME, with and without
// the 124 zero bytes.
func TestHandshakeExportNameFallback(t *testing.T) {
	for _, noZeroes := range []bool{true, false} {
		a, b := net.Pipe()
		go func() {
			defer b.Close()
			r := bufio.NewReader(b)
			hf := uint16(nbdwire.FlagFixedNewstyle)
			if noZeroes {
				hf |= nbdwire.FlagNoZeroes
			}
			g := binary.BigEndian.AppendUint64(nil, nbdwire.MagicNBD)
			g = binary.BigEndian.AppendUint64(g, nbdwire.MagicOption)
			b.Write(binary.BigEndian.AppendUint16(g, hf))
			var cf [4]byte
			io.ReadFull(r, cf[:])
			var oh [16]byte
			io.ReadFull(r, oh[:])
			io.CopyN(io.Discard, r, int64(binary.BigEndian.Uint32(oh[12:])))
			rep := binary.BigEndian.AppendUint64(nil, nbdwire.MagicOptionReply)
			rep = binary.BigEndian.AppendUint32(rep, binary.BigEndian.Uint32(oh[8:]))
			rep = binary.BigEndian.AppendUint32(rep, nbdwire.RepErrUnsupported)
			b.Write(binary.BigEndian.AppendUint32(rep, 0))
			io.ReadFull(r, oh[:])
			name := make([]byte, binary.BigEndian.Uint32(oh[12:]))
			io.ReadFull(r, name)
			if binary.BigEndian.Uint32(oh[8:]) != nbdwire.OptExportName || string(name) != "old" {
				return
			}
			out := binary.BigEndian.AppendUint64(nil, 12345*512)
			out = binary.BigEndian.AppendUint16(out, nbdwire.TransHasFlags|nbdwire.TransReadOnly)
			if !noZeroes {
				out = append(out, make([]byte, 124)...)
			}
			b.Write(out)
		}()
		e, err := handshake(a, "old")
		a.Close()
		if err != nil || e.Size != 12345*512 || !e.ReadOnly() {
			t.Errorf("noZeroes=%v: %+v, %v", noZeroes, e, err)
		}
	}
}

func TestAvailable(t *testing.T) {
	old := sysfs
	t.Cleanup(func() { sysfs = old })
	sysfs = t.TempDir()
	missing := filepath.Join(t.TempDir(), "nbd7")
	err := Available(missing)
	if !errors.Is(err, ErrNoDevice) || !strings.Contains(err.Error(), "modprobe nbd") {
		t.Errorf("no module: %v", err)
	}
	os.MkdirAll(filepath.Join(sysfs, "module", "nbd"), 0o755)
	if err := Available(missing); !errors.Is(err, ErrNoDevice) || !strings.Contains(err.Error(), "nbds_max") {
		t.Errorf("module without the device: %v", err)
	}
	regular := filepath.Join(t.TempDir(), "file")
	os.WriteFile(regular, nil, 0o600)
	if err := Available(regular); !errors.Is(err, ErrNotNBD) {
		t.Errorf("regular file: %v", err)
	}
	if err := Available("/dev/null"); !errors.Is(err, ErrNotNBD) {
		t.Errorf("character device: %v", err)
	}
	if _, err := Connect(context.Background(), missing, "/nonexistent.sock", ""); !errors.Is(err, ErrNoDevice) {
		t.Errorf("Connect without a device: %v", err)
	}
}

// The ioctl numbers against the system's own linux/nbd.h, through gcc.
func TestIoctlNumbersMatchHeader(t *testing.T) {
	gcc := oracle.Require(t, "gcc")
	if _, err := os.Stat("/usr/include/linux/nbd.h"); err != nil {
		if oracle.InCI() {
			t.Fatal("no /usr/include/linux/nbd.h (apt-get install linux-libc-dev): required under CI")
		}
		t.Skip("no /usr/include/linux/nbd.h (apt-get install linux-libc-dev)")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "n.c")
	os.WriteFile(src, []byte(`#include <stdio.h>
#include <sys/ioctl.h>
#include <linux/nbd.h>
int main(void) {
	printf("%lu %lu %lu %lu %lu %lu %lu\n", (unsigned long)NBD_SET_SOCK, (unsigned long)NBD_SET_BLKSIZE,
		(unsigned long)NBD_SET_SIZE, (unsigned long)NBD_DO_IT, (unsigned long)NBD_CLEAR_SOCK,
		(unsigned long)NBD_DISCONNECT, (unsigned long)NBD_SET_FLAGS);
	printf("%d %d\n", NBD_FLAG_HAS_FLAGS, NBD_FLAG_READ_ONLY);
	return 0;
}
`), 0o600)
	bin := filepath.Join(dir, "n")
	if out, err := exec.Command(gcc, "-o", bin, src).CombinedOutput(); err != nil {
		t.Fatalf("gcc: %v\n%s", err, out)
	}
	out, err := exec.Command(bin).Output()
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("%d %d %d %d %d %d %d\n%d %d\n", ioctlSetSock, ioctlSetBlksize, ioctlSetSize, ioctlDoIt,
		ioctlClearSock, ioctlDisconnect, ioctlSetFlags, nbdwire.TransHasFlags, nbdwire.TransReadOnly)
	if string(out) != want {
		t.Errorf("linux/nbd.h says\n%swe have\n%s", out, want)
	}
}

// The kernel part needs /dev/nbd0 (the nbd module) and root. This machine
// and CI have neither: no nbd module is loaded and none can be, so the
// test skips there, which issue 8 item 4 allows; the handshake it builds
// on is tested above against our server and qemu-nbd, and the ioctl
// numbers against linux/nbd.h.
func TestKernelDevice(t *testing.T) {
	const dev = "/dev/nbd0"
	if err := Available(dev); err != nil {
		t.Skipf("kernel nbd device unusable here, so only the handshake and ioctl numbers are tested: %v", err)
	}
	disk := &memDisk{data: make([]byte, 16<<20)}
	sock := serve(t, nbd.Export{Name: "disk", Backend: disk})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := Connect(ctx, dev, sock, "disk")
	if err != nil {
		t.Fatal(err)
	}
	if err := Available(dev); !errors.Is(err, ErrBusy) {
		t.Errorf("Available on a connected device: %v", err)
	}
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	msg := bytes.Repeat([]byte("blktap!\n"), 512)
	if _, err := f.WriteAt(msg, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	disk.mu.RLock()
	ok := bytes.Equal(disk.data[1<<20:1<<20+len(msg)], msg)
	disk.mu.RUnlock()
	if !ok {
		t.Error("a write to the device did not reach the export")
	}
	if err := c.Disconnect(); err != nil {
		t.Fatal(err)
	}
	if err := c.Wait(); err != nil {
		t.Errorf("Wait after Disconnect: %v", err)
	}
	if err := Available(dev); err != nil {
		t.Errorf("device not free after Wait: %v", err)
	}
}

// FuzzHandshake feeds server bytes to the client side of the handshake.
func FuzzHandshake(f *testing.F) {
	for _, s := range seedServerStreams() {
		f.Add(s.data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		rw := struct {
			io.Reader
			io.Writer
		}{bytes.NewReader(data), io.Discard}
		e, err := handshake(rw, "disk")
		if err != nil {
			return
		}
		if e.Flags&nbdwire.TransHasFlags == 0 || e.Size < 0 {
			t.Fatalf("accepted %+v", e)
		}
		if _, err := blockSize(e); err != nil && e.MinBlock <= 4096 {
			t.Fatalf("block size for %+v: %v", e, err)
		}
	})
}

type seed struct {
	name string
	data []byte
}

// seedServerStreams are server byte streams: well-formed ones reaching
// every path, and broken ones named for their fault.
func seedServerStreams() []seed {
	greet := func(hf uint16) []byte {
		g := binary.BigEndian.AppendUint64(nil, nbdwire.MagicNBD)
		g = binary.BigEndian.AppendUint64(g, nbdwire.MagicOption)
		return binary.BigEndian.AppendUint16(g, hf)
	}
	reply := func(b []byte, typ uint32, d []byte) []byte {
		b = binary.BigEndian.AppendUint64(b, nbdwire.MagicOptionReply)
		b = binary.BigEndian.AppendUint32(b, nbdwire.OptGo)
		b = binary.BigEndian.AppendUint32(b, typ)
		b = binary.BigEndian.AppendUint32(b, uint32(len(d)))
		return append(b, d...)
	}
	exp := func(size uint64, flags uint16) []byte {
		d := binary.BigEndian.AppendUint16(nil, nbdwire.InfoExport)
		d = binary.BigEndian.AppendUint64(d, size)
		return binary.BigEndian.AppendUint16(d, flags)
	}
	bs := func(min, pref, max uint32) []byte {
		d := binary.BigEndian.AppendUint16(nil, nbdwire.InfoBlockSize)
		d = binary.BigEndian.AppendUint32(d, min)
		d = binary.BigEndian.AppendUint32(d, pref)
		return binary.BigEndian.AppendUint32(d, max)
	}
	both := nbdwire.FlagFixedNewstyle | nbdwire.FlagNoZeroes
	var out []seed
	b := reply(greet(uint16(both)), nbdwire.RepInfo, exp(1<<30, 0x0d6d))
	b = reply(b, nbdwire.RepInfo, bs(1, 4096, 32<<20))
	out = append(out, seed{"go-ok", reply(b, nbdwire.RepAck, nil)})

	b = reply(greet(uint16(both)), nbdwire.RepInfo, exp(1<<20, 3))
	b = reply(b, nbdwire.RepInfo, bs(8192, 8192, 1<<20))
	out = append(out, seed{"go-min-block-too-big", reply(b, nbdwire.RepAck, nil)})

	b = reply(greet(uint16(both)), nbdwire.RepErrUnsupported, nil)
	b = binary.BigEndian.AppendUint64(b, 4096)
	out = append(out, seed{"export-name-fallback", binary.BigEndian.AppendUint16(b, 1)})

	out = append(out, seed{"go-refused-tls-required", reply(greet(uint16(both)), nbdwire.RepErrorBit|5, []byte("TLS required\n"))})
	out = append(out, seed{"go-ack-without-export", reply(greet(uint16(both)), nbdwire.RepAck, nil)})
	out = append(out, seed{"go-reply-huge-length", reply(greet(uint16(both)), nbdwire.RepInfo, nil)[:34]})
	out = append(out, seed{"oldstyle-server", append(binary.BigEndian.AppendUint64(nil, nbdwire.MagicNBD), 0, 0x42, 2, 0x81, 0x86, 0x12, 0x53, 0)})
	out = append(out, seed{"not-fixed-newstyle", greet(0)})
	return out
}

var writeSeeds = flag.Bool("write-seeds", false, "rewrite testdata/fuzz seed corpora")

// TestWriteSeeds rewrites the seed corpus when -write-seeds is given and
// otherwise checks it is present.
func TestWriteSeeds(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzHandshake")
	for _, s := range seedServerStreams() {
		p := filepath.Join(dir, s.name)
		want := fmt.Sprintf("go test fuzz v1\n[]byte(%s)\n", strconv.Quote(string(s.data)))
		if *writeSeeds {
			os.MkdirAll(dir, 0o755)
			if err := os.WriteFile(p, []byte(want), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if got, err := os.ReadFile(p); err != nil || string(got) != want {
			t.Errorf("seed %s missing or stale; run go test -run TestWriteSeeds -args -write-seeds", p)
		}
	}
}

// The setup path on its locked, signal-blocked thread, up to the first
// ioctl, which a regular file refuses: the error must name the ioctl and
// leave the Conn finished.
func TestSetupErrorNamesIoctl(t *testing.T) {
	dir := t.TempDir()
	f, err := os.Create(filepath.Join(dir, "not-a-device"))
	if err != nil {
		t.Fatal(err)
	}
	sock, err := os.Create(filepath.Join(dir, "not-a-socket"))
	if err != nil {
		t.Fatal(err)
	}
	a, b := net.Pipe()
	defer b.Close()
	c := &Conn{dev: f.Name(), f: f, sock: sock, nc: a, done: make(chan struct{}), export: Export{Size: 1 << 20, Flags: 1}}
	setup := make(chan error, 1)
	go c.run(512, setup)
	err = <-setup
	if err == nil || !strings.Contains(err.Error(), "NBD_SET_BLKSIZE") || !errors.Is(err, syscall.ENOTTY) {
		t.Errorf("setup on a regular file: %v", err)
	}
	select {
	case <-c.done:
	case <-time.After(10 * time.Second):
		t.Fatal("run did not finish after a failed setup")
	}
	if _, err := f.Write([]byte("x")); err == nil {
		t.Error("the device file was left open")
	}
}
