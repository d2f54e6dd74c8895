package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/nbdwire"
	"github.com/blktap-go/blktap/internal/oracle"
	"github.com/blktap-go/blktap/internal/testpki"
	"github.com/blktap-go/blktap/internal/testutil"
)

// TLS (proto.md "TLS support", FORCEDTLS mode) checked three ways: a
// byte-level client written from proto.md, libnbd (nbdinfo, which uses
// GnuTLS) and qemu (qemu-io, qemu-img: GnuTLS again, through
// tls-creds-x509). Certificates are made at test time.

// startTLSServer serves exp on loopback TCP, TLS-only when cfg is set,
// and returns the server and its address.
func startTLSServer(t testing.TB, exp Export, cfg *tls.Config) (*Server, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{Export: exp, TLSConfig: cfg, HandshakeTimeout: 20 * time.Second}
	testutil.Serve(t, s, ln)
	return s, ln.Addr().String()
}

func dialTCP(t testing.TB, addr string) *testClient {
	t.Helper()
	c := testutil.Dial(t, "tcp", addr, 30*time.Second)
	return &testClient{c: c, br: bufio.NewReader(c), reads: map[uint64]uint64{}, metaIDs: map[string]uint32{}}
}

// startTLS sends STARTTLS, expects the ACK and upgrades tc.
func (tc *testClient) startTLS(cfg *tls.Config) error {
	if typ, err := tc.simpleOpt(nbdwire.OptStartTLS); err != nil || typ != nbdwire.RepAck {
		return fmt.Errorf("STARTTLS: reply %#x, %v", typ, err)
	}
	if tc.br.Buffered() != 0 {
		return fmt.Errorf("%d bytes after the STARTTLS ACK, before TLS", tc.br.Buffered())
	}
	c := tls.Client(tc.c, cfg)
	if err := c.Handshake(); err != nil {
		return err
	}
	tc.c, tc.br = c, bufio.NewReader(c)
	return nil
}

func serverTLS(t testing.TB, p *testpki.PKI, verifyClients bool) *tls.Config {
	t.Helper()
	ca := ""
	if verifyClients {
		ca = p.CA
	}
	cfg, err := LoadTLSConfig(p.ServerCert, p.ServerKey, ca)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func TestTLSForcedHaggling(t *testing.T) {
	p := testpki.New(t)
	be := newMem(1 << 20)
	s, addr := startTLSServer(t, Export{Name: "disk", Backend: be}, serverTLS(t, p, true))
	clientCfg := &tls.Config{RootCAs: p.Roots, ServerName: "localhost", Certificates: []tls.Certificate{p.Client}}

	t.Run("options refused until STARTTLS, then served", func(t *testing.T) {
		tlsRefusedThenServed(t, addr, clientCfg, be)
	})

	t.Run("ABORT before TLS is acknowledged", func(t *testing.T) {
		tc := dialTCP(t, addr)
		if err := tc.greet(nbdwire.ClientFlagFixedNewstyle); err != nil {
			t.Fatal(err)
		}
		if typ, err := tc.simpleOpt(nbdwire.OptAbort); err != nil || typ != nbdwire.RepAck {
			t.Fatalf("ABORT: %#x %v", typ, err)
		}
		expectClosed(t, tc)
	})

	t.Run("EXPORT_NAME before TLS drops the client", func(t *testing.T) {
		before := s.Stats().Dropped
		tc := dialTCP(t, addr)
		if err := tc.greet(nbdwire.ClientFlagFixedNewstyle | nbdwire.ClientFlagNoZeroes); err != nil {
			t.Fatal(err)
		}
		tc.sendOpt(nbdwire.OptExportName, []byte("disk"))
		expectClosed(t, tc)
		waitDropped(t, s, before)
	})
	t.Run("no FIXED_NEWSTYLE drops the client", func(t *testing.T) {
		tc := dialTCP(t, addr)
		if err := tc.greet(0); err != nil {
			t.Fatal(err)
		}
		expectClosed(t, tc)
	})
	for _, c := range []struct {
		name string
		cfg  *tls.Config
	}{
		{"client without certificate", &tls.Config{RootCAs: p.Roots, ServerName: "localhost"}},
		{"client certificate from another CA", &tls.Config{RootCAs: p.Roots, ServerName: "localhost",
			Certificates: []tls.Certificate{testpki.New(t).Client}}},
	} {
		t.Run(c.name+" fails the TLS handshake", func(t *testing.T) {
			before := s.Stats().Dropped
			tc := dialTCP(t, addr)
			if err := tc.greet(nbdwire.ClientFlagFixedNewstyle | nbdwire.ClientFlagNoZeroes); err != nil {
				t.Fatal(err)
			}
			err := tc.startTLS(c.cfg)
			if err == nil {
				// TLS 1.3 reports a refused client certificate on
				// the first read, not in the handshake.
				_, _, _, err = tc.optReply()
			}
			if err == nil {
				t.Fatal("the server accepted the client")
			}
			waitDropped(t, s, before)
		})
	}
}

// tlsRefusedThenServed: before STARTTLS every option is refused with
// ERR_TLS_REQD; after it the handshake and transmission go on as usual.
func tlsRefusedThenServed(t *testing.T, addr string, clientCfg *tls.Config, be *memBackend) {
	tc := dialTCP(t, addr)
	if err := tc.greet(nbdwire.ClientFlagFixedNewstyle | nbdwire.ClientFlagNoZeroes); err != nil {
		t.Fatal(err)
	}
	goData := infoData("disk")
	for _, st := range []struct {
		opt  uint32
		data []byte
		want uint32
	}{
		{nbdwire.OptList, nil, nbdwire.RepErrTLSRequired},
		{nbdwire.OptInfo, goData, nbdwire.RepErrTLSRequired},
		{nbdwire.OptGo, goData, nbdwire.RepErrTLSRequired},
		{nbdwire.OptStructuredReply, nil, nbdwire.RepErrTLSRequired},
		{nbdwire.OptExtendedHeaders, nil, nbdwire.RepErrTLSRequired},
		{99, []byte("junk"), nbdwire.RepErrTLSRequired},
		{nbdwire.OptStartTLS, []byte("x"), nbdwire.RepErrInvalid},
	} {
		if err := tc.sendOpt(st.opt, st.data); err != nil {
			t.Fatal(err)
		}
		opt, typ, msg, err := tc.optReply()
		if err != nil || opt != st.opt || typ != st.want {
			t.Fatalf("option %d: reply to %d type %#x %q, %v; want %#x", st.opt, opt, typ, msg, err, st.want)
		}
	}
	// A too-long option is refused the same way before TLS.
	tc.sendOpt(nbdwire.OptList, make([]byte, maxOptionLen+1))
	if _, typ, _, err := tc.optReply(); err != nil || typ != nbdwire.RepErrTLSRequired {
		t.Fatalf("long option before TLS: %#x %v", typ, err)
	}
	tlsServed(t, tc, clientCfg, be, goData)
}

// tlsServed upgrades tc, which has greeted, and then negotiates, writes and
// reads over TLS.
func tlsServed(t *testing.T, tc *testClient, clientCfg *tls.Config, be *memBackend, goData []byte) {
	if err := tc.startTLS(clientCfg); err != nil {
		t.Fatal(err)
	}
	if typ, err := tc.simpleOpt(nbdwire.OptStartTLS); err != nil || typ != nbdwire.RepErrInvalid {
		t.Fatalf("second STARTTLS: %#x %v, want ERR_INVALID", typ, err)
	}
	// Inside TLS the handshake goes on as usual; greet is done.
	if typ, err := tc.simpleOpt(nbdwire.OptStructuredReply); err != nil || typ != nbdwire.RepAck {
		t.Fatalf("STRUCTURED_REPLY in TLS: %#x %v", typ, err)
	}
	tc.structured = true
	if err := tc.sendOpt(nbdwire.OptGo, goData); err != nil {
		t.Fatal(err)
	}
	err := tc.untilAck(func(typ uint32, data []byte) error {
		if typ != nbdwire.RepInfo {
			return fmt.Errorf("GO: %#x %q", typ, data)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	payload := []byte(strings.Repeat("tls!", 1024))
	mustOK(t)(tc.do(Request{Type: nbdwire.CmdWrite, Flags: nbdwire.CmdFlagFUA, Cookie: 1, Offset: 8192, Length: 4096}, payload))
	rep := mustOK(t)(tc.do(Request{Type: nbdwire.CmdRead, Cookie: 2, Offset: 8192, Length: 4096}, nil))
	got, err := rep.readData(8192, 4096)
	if err != nil || string(got) != string(payload) {
		t.Fatalf("read back over TLS: %v", err)
	}
	if string(be.data[8192:8192+4096]) != string(payload) {
		t.Fatal("write over TLS did not reach the backend")
	}
	if err := tc.send(Request{Type: nbdwire.CmdDisc, Cookie: 3}, nil); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, tc)
}

// waitDropped waits for s to count a dropped client beyond before.
func waitDropped(t *testing.T, s *Server, before uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for s.Stats().Dropped == before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if s.Stats().Dropped == before {
		t.Error("the server did not count the client as dropped")
	}
}

// Without TLSConfig nothing changes: STARTTLS is refused by policy and
// the option after it is served in clear.
func TestNoTLSRefusesStartTLS(t *testing.T) {
	_, addr := startTLSServer(t, Export{Name: "disk", Backend: newMem(1 << 20)}, nil)
	tc := dialTCP(t, addr)
	if err := tc.greet(nbdwire.ClientFlagFixedNewstyle); err != nil {
		t.Fatal(err)
	}
	if typ, err := tc.simpleOpt(nbdwire.OptStartTLS); err != nil || typ != nbdwire.RepErrPolicy {
		t.Fatalf("STARTTLS: %#x %v, want ERR_POLICY", typ, err)
	}
	if typ, err := tc.simpleOpt(nbdwire.OptStructuredReply); err != nil || typ != nbdwire.RepAck {
		t.Fatalf("STRUCTURED_REPLY: %#x %v", typ, err)
	}
}

func TestLoadTLSConfigErrors(t *testing.T) {
	p := testpki.New(t)
	bogus := filepath.Join(t.TempDir(), "bogus.pem")
	os.WriteFile(bogus, []byte("not pem"), 0o600)
	for _, c := range [][3]string{
		{p.ServerCert, bogus, ""},
		{filepath.Join(t.TempDir(), "missing.pem"), p.ServerKey, ""},
		{p.ServerCert, p.ServerKey, bogus},
		{p.ServerCert, p.ServerKey, filepath.Join(t.TempDir(), "missing.pem")},
	} {
		if _, err := LoadTLSConfig(c[0], c[1], c[2]); !errors.Is(err, ErrTLSConfig) {
			t.Errorf("LoadTLSConfig%q: %v, want ErrTLSConfig", c, err)
		}
	}
	s := &Server{Export: Export{Backend: newMem(512)}, TLSConfig: &tls.Config{}}
	if err := s.Serve(context.Background(), nil); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("Serve with a TLSConfig without certificate: %v", err)
	}
}

// libnbd (GnuTLS) against the TLS-only server: nbds:// with the client
// directory works and shows the same export; plain nbd:// and a client
// with a certificate from another CA are refused.
func TestNbdinfoTLS(t *testing.T) {
	nbdinfo := oracle.Require(t, "nbdinfo")
	p := testpki.New(t)
	be, _ := newFileBackend(t, 8<<20)
	_, addr := startTLSServer(t, Export{Name: "disk", Backend: be}, serverTLS(t, p, true))
	uri := fmt.Sprintf("nbds://%s/disk?tls-certificates=%s", addr, p.ClientDir)
	info := nbdinfoJSON(t, uri)
	if len(info.Exports) != 1 {
		t.Fatalf("exports: %+v", info)
	}
	e := info.Exports[0]
	if e.Size != 8<<20 || !e.CanFlush || !e.CanFUA || !e.CanMultiConn || !e.CanZero || !e.CanFastZero ||
		e.BlockMax != MaxPayload || !info.Structured {
		t.Errorf("over TLS: %+v structured=%v", e, info.Structured)
	}

	out, err := runErr(nbdinfo, fmt.Sprintf("nbd://%s/disk", addr))
	if err == nil {
		t.Fatalf("nbdinfo without TLS was served:\n%s", out)
	}
	if !strings.Contains(strings.ToLower(out), "tls") {
		t.Errorf("plain nbdinfo's error does not mention TLS:\n%s", out)
	}
	t.Logf("plain client refused: %s", strings.TrimSpace(out))

	other := testpki.New(t)
	// The right CA for the server, the wrong one for the client's
	// certificate: only the client's authentication fails.
	caPEM, _ := os.ReadFile(p.CA)
	os.WriteFile(filepath.Join(other.ClientDir, "ca-cert.pem"), caPEM, 0o600)
	if out, err := runErr(nbdinfo, fmt.Sprintf("nbds://%s/disk?tls-certificates=%s", addr, other.ClientDir)); err == nil {
		t.Errorf("nbdinfo with a foreign client certificate was served:\n%s", out)
	}
}

// libnbd in option mode walks the FORCEDTLS rules: testdata/tls.py.
func TestNbdshTLSOptionMode(t *testing.T) {
	p := testpki.New(t)
	_, addr := startTLSServer(t, Export{Name: "disk", Backend: newMem(1 << 20)}, serverTLS(t, p, true))
	_, port, _ := net.SplitHostPort(addr)
	out := nbdsh(t, "tls.py", "PORT="+port, "CERTS="+p.ClientDir)
	t.Logf("nbdsh tls.py:\n%s", out)
	for _, want := range []string{"before TLS info refused", "before TLS list refused",
		"in TLS list: ['disk']", "\nok"} {
		if !strings.Contains(out, want) {
			t.Errorf("nbdsh tls.py: no %q", want)
		}
	}
}

// qemu's NBD client (GnuTLS through tls-creds-x509) writes and verifies
// patterns through the TLS export, and qemu-img info sees its size.
func TestQemuTLS(t *testing.T) {
	qemuIO := oracle.Require(t, "qemu-io")
	qemuImg := oracle.Require(t, "qemu-img")
	p := testpki.New(t)
	be, path := newFileBackend(t, 16<<20)
	_, addr := startTLSServer(t, Export{Name: "disk", Backend: be}, serverTLS(t, p, true))
	host, port, _ := net.SplitHostPort(addr)
	obj := "tls-creds-x509,id=tls0,endpoint=client,dir=" + p.ClientDir
	opts := fmt.Sprintf("driver=nbd,host=%s,port=%s,export=disk,tls-creds=tls0", host, port)

	out := run(t, qemuIO, "--object", obj, "--image-opts", opts,
		"-c", "write -P 0x5c 1M 2M", "-c", "read -P 0x5c 1M 2M", "-c", "flush")
	if strings.Contains(out, "fail") || strings.Contains(out, "rror") {
		t.Fatalf("qemu-io over TLS:\n%s", out)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for i := 1 << 20; i < 3<<20; i++ {
		if raw[i] != 0x5c {
			t.Fatalf("file byte %d = %#x after qemu-io over TLS", i, raw[i])
		}
	}
	out = run(t, qemuImg, "info", "--output=json", "--object", obj, "--image-opts", opts)
	if !strings.Contains(out, fmt.Sprintf(`"virtual-size": %d`, 16<<20)) {
		t.Errorf("qemu-img info over TLS:\n%s", out)
	}
	// qemu without tls-creds is refused too.
	out, err = runErr(qemuImg, "info", "--image-opts", fmt.Sprintf("driver=nbd,host=%s,port=%s,export=disk", host, port))
	if err == nil {
		t.Errorf("qemu-img without TLS was served:\n%s", out)
	}
	t.Logf("plain qemu-img refused: %s", strings.TrimSpace(out))
}

// BenchmarkTCPRead4k measures 4 KiB reads at queue depth 16 over loopback
// TCP, in clear and inside TLS, with a client written from proto.md.
func BenchmarkTCPRead4k(b *testing.B) {
	p := testpki.New(b)
	for _, useTLS := range []bool{false, true} {
		b.Run(map[bool]string{false: "plain", true: "tls"}[useTLS], func(b *testing.B) {
			var cfg *tls.Config
			if useTLS {
				cfg = serverTLS(b, p, true)
			}
			_, addr := startTLSServer(b, Export{Name: "disk", Backend: newMem(64 << 20)}, cfg)
			tc := dialTCP(b, addr)
			tc.c.SetDeadline(time.Time{})
			if err := tc.greet(nbdwire.ClientFlagFixedNewstyle | nbdwire.ClientFlagNoZeroes); err != nil {
				b.Fatal(err)
			}
			if useTLS {
				if err := tc.startTLS(&tls.Config{RootCAs: p.Roots, ServerName: "localhost",
					Certificates: []tls.Certificate{p.Client}}); err != nil {
					b.Fatal(err)
				}
			}
			tc.sendOpt(nbdwire.OptGo, infoData("disk"))
			if err := tc.untilAck(nil); err != nil {
				b.Fatal(err)
			}
			pipeline(b, tc.br, bufio.NewWriterSize(tc.c, 64<<10), nbdwire.CmdRead)
		})
	}
}
