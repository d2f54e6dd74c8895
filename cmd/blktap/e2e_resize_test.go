package main

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// A disk the daemon serves is not resized, whatever its format: the
// worker's lock refuses it; once detached, it is resized.
func TestEndToEndResizeInUse(t *testing.T) {
	bin, dir, d := idleDaemon(t)
	for i, f := range []string{"raw", "vhd", "qcow2"} {
		img := filepath.Join(dir, "served."+f)
		args := []string{"image", "create", "-f", f, img, "8M"}
		if f == "vhd" {
			args = append(args, "-o", "subformat=fixed") // a dynamic one grows only within its BAT
		}
		if out, err := exec.Command(bin, args...).CombinedOutput(); err != nil {
			t.Fatalf("%v %s", err, out)
		}
		vdev := "xvd" + string(rune('c'+i))
		d.attachURI("0", f+":"+img, vdev, "w")
		out, err := exec.Command(bin, "image", "resize", "-f", f, img, "16M").CombinedOutput()
		if err == nil || !strings.Contains(string(out), "is in use") {
			t.Fatalf("%s served by a worker: resize %v %s, want refused as in use", f, err, out)
		}
		if _, err := d.blktap("detach", "0", vdev); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command(bin, "image", "resize", "-f", f, img, "16M").CombinedOutput(); err != nil {
			t.Fatalf("%s after detach: %v %s", f, err, out)
		}
	}
}
