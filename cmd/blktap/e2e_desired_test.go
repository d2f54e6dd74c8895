package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Issue 16 item 4 through the binary: an empty or half-written YAML file
// keeps every disk and `blktap ls` says why; disks: [] detaches them; a
// bare qcow2 path is refused by attach, a bare raw one served.
func TestEndToEndDesiredStateSafety(t *testing.T) {
	bin := buildBinary(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "disks.yaml")
	write := func(body string) { t.Helper(); replaceFile(t, cfg, body) }
	write(fmt.Sprintf("disks:\n  - {name: one, image: %s/one.raw, format: raw, domain: 0, device: xvdb, create: {size: 8M}}\n", dir))
	d := startDaemon(t, bin, cfg)
	d.waitConnected("one")

	for _, body := range []string{"", "disks:\n", "# all commented out\n"} {
		write(body)
		d.waitRefused("")
		if r, ok := d.row("one"); !ok || r.Phase != "connected" {
			t.Fatalf("file %q took the disk away: %+v", body, r)
		}
	}
	if msg := d.lsStderr(); !strings.Contains(msg, "disks: []") {
		t.Errorf("the refusal does not say how to detach everything: %s", msg)
	}

	// Attach beside the YAML's disk: a bare qcow2 is refused, raw is served.
	qcow2 := filepath.Join(dir, "F.qcow2")
	if out, err := exec.Command(bin, "image", "create", "-f", "qcow2", qcow2, "8M").CombinedOutput(); err != nil {
		t.Fatalf("image create: %v\n%s", err, out)
	}
	_, err := d.blktap("attach", "0", qcow2, "xvdk", "w")
	if err == nil || !strings.Contains(err.Error(), qcow2+" is qcow2: write qcow2:"+qcow2+", or raw:"+qcow2+" to serve its bytes") {
		t.Fatalf("bare qcow2 attach: %v", err)
	}
	raw := filepath.Join(dir, "bare.img")
	if err := os.WriteFile(raw, make([]byte, 4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	d.attachURI("0", raw, "xvdl", "w")
	if _, err := d.blktap("detach", "0", "xvdl"); err != nil {
		t.Fatal(err)
	}

	write("disks: []\n")
	d.waitGone("one", "disks: [] left the disk attached")
	if msg := d.lsStderr(); msg != "" {
		t.Errorf("ls still reports a refusal after an accepted reload: %s", msg)
	}
}
