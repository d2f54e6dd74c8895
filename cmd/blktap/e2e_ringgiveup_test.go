package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/oracle"
	"github.com/blktap-go/blktap/internal/ringfault"
)

// The daemon's frontend of a guest disk finds its ring broken (rsp_prod
// past its requests, as a confused worker would leave it): `blktap ls`
// shows the disk closing with the reason, then connected again, by
// itself, with the same worker and every write acknowledged before.
func TestEndToEndFrontendGivesUp(t *testing.T) {
	qemuIO := oracle.Require(t, "qemu-io")
	bin := buildBinary(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "disks.yaml")
	yaml := fmt.Sprintf(`disks:
  - {name: g, image: %s/g.qcow2, format: qcow2, domain: 1, device: xvdb, create: {size: 16M}}
`, dir)
	if err := os.WriteFile(cfg, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, bin, cfg)
	before := d.waitConnected("g")["g"]
	runTool(t, qemuIO, "-f", "raw", before.Export, "-c", "write -P 0x71 0 1M", "-c", "write -P 0x72 8M 1M", "-c", "flush")

	// A client connected across the break: its requests may fail, but it
	// must not hold the reconnect up.
	held := exec.Command(qemuIO, "-f", "raw", before.Export)
	heldIn, err := held.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	heldOut := &strings.Builder{}
	held.Stdout, held.Stderr = heldOut, heldOut
	if err := held.Start(); err != nil {
		t.Fatal(err)
	}
	defer held.Process.Kill()
	fmt.Fprintln(heldIn, "read -P 0x71 0 4k")
	time.Sleep(500 * time.Millisecond)
	broke := time.Now()
	if n, err := ringfault.BreakRings(d.cmd.Process.Pid, ringfault.Responses); err != nil || n != 1 {
		t.Fatalf("BreakRings: %d rings, %v", n, err)
	}
	seen := waitClosing(t, d, "g")
	if !strings.Contains(seen.Error, "local frontend gave up") || !strings.Contains(seen.Error, "rsp_prod") {
		t.Errorf("ls while closing: error %q, want the frontend's reason", seen.Error)
	}

	shown := time.Since(broke)
	after := d.waitConnected("g")["g"]
	t.Logf("closing with the reason after %v, connected again after %v", shown.Round(time.Millisecond), time.Since(broke).Round(time.Millisecond))
	if after.Error != "" {
		t.Errorf("reconnected with error %q", after.Error)
	}
	if after.WorkerPid != before.WorkerPid {
		t.Errorf("worker %d replaced by %d; only the ring had to be reconnected", before.WorkerPid, after.WorkerPid)
	}
	if after.Export != before.Export {
		t.Errorf("guest view moved from %s to %s", before.Export, after.Export)
	}
	if reconnect := time.Since(broke); reconnect > 10*time.Second {
		t.Errorf("reconnected after %v: the held client delayed it", reconnect)
	}
	fmt.Fprintln(heldIn, "read 0 4k")
	heldIn.Close()
	held.Wait()
	t.Logf("client held across the break:\n%s", heldOut)
	runTool(t, qemuIO, "-f", "raw", after.Export, "-c", "read -P 0x71 0 1M", "-c", "read -P 0x72 8M 1M",
		"-c", "write -P 0x73 4M 1M", "-c", "flush", "-c", "read -P 0x73 4M 1M")
}

// waitClosing polls ls --json (often: the phase is brief) until disk name
// shows closing, and returns its row then.
func waitClosing(t *testing.T, d *daemon, name string) lsRow {
	var seen lsRow
	deadline := time.Now().Add(15 * time.Second)
	for seen.Phase != "closing" {
		if time.Now().After(deadline) {
			t.Fatalf("the broken ring never showed in ls: last %+v", seen)
		}
		out, err := d.blktap("ls", "--json")
		if err != nil {
			t.Fatal(err)
		}
		var rows []lsRow
		if err := json.Unmarshal([]byte(out), &rows); err != nil {
			t.Fatalf("ls --json: %v\n%s", err, out)
		}
		for _, r := range rows {
			if r.Name == name {
				seen = r
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return seen
}
