package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/internal/oracle"
	"github.com/blktap-go/blktap/internal/testpki"
)

func freeLoopbackPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// A TCP export from the YAML is TLS-only (nbds://), for the dom0 export
// (TLS in the worker) and the guest view (TLS in the daemon) alike.
func TestEndToEndTLSExport(t *testing.T) {
	nbdinfo := oracle.Require(t, "nbdinfo")
	bin := buildBinary(t)
	dir := t.TempDir()
	p := testpki.New(t)
	addr0, addr1 := freeLoopbackPort(t), freeLoopbackPort(t)
	cfg := filepath.Join(dir, "disks.yaml")
	tlsKeys := fmt.Sprintf("{cert: %s, key: %s, ca: %s}", p.ServerCert, p.ServerKey, p.CA)
	yaml := fmt.Sprintf(`disks:
  - {name: t0, image: %[1]s/t0.raw, format: raw, domain: 0, device: xvdb, create: {size: 8M}, export: {tcp: "%[2]s", tls: %[4]s}}
  - {name: t1, image: %[1]s/t1.raw, format: raw, domain: 1, device: xvdb, create: {size: 8M}, export: {tcp: "%[3]s", tls: %[4]s}}
`, dir, addr0, addr1, tlsKeys)
	if err := os.WriteFile(cfg, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, bin, cfg)
	rows := d.waitConnected("t0", "t1")
	for name, addr := range map[string]string{"t0": addr0, "t1": addr1} {
		if want := "nbds://" + addr + "/"; rows[name].Export != want {
			t.Fatalf("%s export %q, want %q", name, rows[name].Export, want)
		}
		out := runTool(t, nbdinfo, "--size", "nbds://"+addr+"/?tls-certificates="+p.ClientDir)
		if strings.TrimSpace(out) != "8388608" {
			t.Fatalf("%s over TLS: %s", name, out)
		}
		if out, err := exec.Command(nbdinfo, "--size", "nbd://"+addr+"/").CombinedOutput(); err == nil {
			t.Fatalf("%s answered a plain-text client: %s", name, out)
		}
	}
}
