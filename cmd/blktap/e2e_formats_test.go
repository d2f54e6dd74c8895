package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/oracle"
)

// Every format is served through both paths (the domain-0 export and the
// guest's ring), and what we write there is what qemu reads in the image.
func TestEndToEndFormats(t *testing.T) {
	qemuIO := oracle.Require(t, "qemu-io")
	qemuImg := oracle.Require(t, "qemu-img")
	bin := buildBinary(t)
	dir := t.TempDir()
	d := startDaemon(t, bin, "")
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := d.blktap("ls"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("daemon never answered ls")
		}
		time.Sleep(100 * time.Millisecond)
	}
	// format as we name it -> as qemu-img names it
	cases := []struct{ ours, qemu string }{
		{"raw", "raw"},
		{"qcow", "qcow"},
		{"vmdk", "vmdk"},
		{"vhd", "vpc"},
	}
	for i, c := range cases {
		for _, domid := range []string{"0", "1"} {
			t.Run(c.ours+"/dom"+domid, func(t *testing.T) {
				img := filepath.Join(dir, c.ours+domid+".img")
				if out, err := exec.Command(bin, "image", "create", "-f", c.ours, img, "64M").CombinedOutput(); err != nil {
					t.Fatalf("image create: %v %s", err, out)
				}
				vdev := "xvd" + string(rune('c'+i))
				out, err := d.blktap("attach", domid, c.ours+":"+img, vdev, "w")
				if err != nil {
					t.Fatal(err)
				}
				uri := strings.TrimSpace(out)
				runTool(t, qemuIO, "-f", "raw", uri,
					"-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 1M 1M", "-c", "write -P 0x33 63M 1M",
					"-c", "read -P 0x22 1M 1M", "-c", "flush")
				if _, err := d.blktap("detach", domid, vdev); err != nil {
					t.Fatal(err)
				}
				// qemu reads our image.
				rawOut := filepath.Join(dir, c.ours+domid+".out")
				runTool(t, qemuImg, "convert", "-f", c.qemu, "-O", "raw", img, rawOut)
				b, err := os.ReadFile(rawOut)
				if err != nil {
					t.Fatal(err)
				}
				check := func(off, n int, v byte) {
					t.Helper()
					if !bytes.Equal(b[off:off+n], bytes.Repeat([]byte{v}, n)) {
						t.Fatalf("qemu reads something else than 0x%02x at %d+%d", v, off, n)
					}
				}
				check(0, 64<<10, 0x11)
				check(64<<10, (1<<20)-(64<<10), 0)
				check(1<<20, 1<<20, 0x22)
				check(63<<20, 1<<20, 0x33)
				if c.qemu == "qcow2" {
					runTool(t, qemuImg, "check", "-f", "qcow2", img)
				}
			})
		}
	}
}
