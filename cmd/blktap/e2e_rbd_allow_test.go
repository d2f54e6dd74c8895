//go:build rbd

package main

import (
	"strings"
	"testing"
)

// TestEndToEndRBDAllow: an rbd image attached through xenstore (no YAML
// declares its pool) is refused, with the reason in `blktap ls`, until
// blktap run's --rbd-allow names its pool and the options it carries.
func TestEndToEndRBDAllow(t *testing.T) {
	c, qemuIO, bin, name, spec := rbdTest(t)
	c.RBD(t, "create", "--size", "8M", "rbd/"+name)

	d := startDaemon(t, bin, "", "--rbd-allow", "rbd") // the pool, but not through this conf file
	d.waitAnswering()
	out, err := d.blktap("attach", "0", "rbd:"+spec, "xvdc", "w", "--timeout", "20s")
	if err == nil {
		t.Fatalf("attach of a pool --rbd-allow does not name with these options succeeded: %s", out)
	}
	if !strings.Contains(err.Error(), "not allowed") || !strings.Contains(err.Error(), "--rbd-allow") {
		t.Fatalf("attach: %v: want it to say the pool is not allowed and how to allow it", err)
	}
	ls, _ := d.blktap("ls")
	t.Logf("attach refused: %v\nls:\n%s", err, ls)
	stopDaemon(t, bin, d.stateDir, d.cmd, d.done)

	d = startDaemon(t, bin, "", "--rbd-allow", "rbd:conf="+c.Conf)
	d.waitAnswering()
	uri := d.attachURI("0", "rbd:"+spec, "xvdc", "w")
	out = runTool(t, qemuIO, "-f", "raw", "-c", "write -P 0x71 0 64k", "-c", "read -P 0x71 0 64k", uri)
	if strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("qemu-io through the allowed disk:\n%s", out)
	}
}
