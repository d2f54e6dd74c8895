package main

import (
	"bytes"
	"fmt"
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
	bin, dir, d := idleDaemon(t)
	// format as we name it -> as qemu-img names it
	cases := []struct{ ours, qemu string }{
		{"raw", "raw"},
		{"qcow", "qcow"},
		{"qcow2", "qcow2"},
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

// The seed's shareable RAM disk: two devices (dom0 and a guest) attach one
// RAM disk by name and see each other's writes at once.
func TestEndToEndSharedRAMDisk(t *testing.T) {
	qemuIO := oracle.Require(t, "qemu-io")
	_, _, d := idleDaemon(t)
	name := fmt.Sprintf("e2e-%d", time.Now().UnixNano())
	uri0 := d.attachURI("0", "ram:"+name+"?size=64M", "xvdc", "w")
	uri1 := d.attachURI("1", "ram:"+name, "xvdc", "w")
	t.Cleanup(func() { os.Remove("/dev/shm/blktap-ram-" + name) })
	runTool(t, qemuIO, "-f", "raw", uri0, "-c", "write -P 0x5e 1M 1M")
	runTool(t, qemuIO, "-f", "raw", uri1, "-c", "read -P 0x5e 1M 1M", "-c", "write -P 0x61 8M 64k")
	runTool(t, qemuIO, "-f", "raw", uri0, "-c", "read -P 0x61 8M 64k")
	bad, _ := exec.Command(qemuIO, "-f", "raw", uri1, "-c", "read -P 0x5e 8M 4k").CombinedOutput()
	if !strings.Contains(string(bad), "verification failed") {
		t.Fatalf("the check cannot fail: %s", bad)
	}
	for _, dv := range [][2]string{{"0", "xvdc"}, {"1", "xvdc"}} {
		if _, err := d.blktap("detach", dv[0], dv[1]); err != nil {
			t.Fatal(err)
		}
	}
}

// A tap device backed by a remote NBD server (qemu-nbd here): fio verify
// through our export, and the data lands in the remote's file.
func TestEndToEndRemoteNBD(t *testing.T) {
	qemuNBD := oracle.Require(t, "qemu-nbd")
	fio := oracle.Require(t, "fio")
	qemuImg := oracle.Require(t, "qemu-img")
	bin := buildBinary(t)
	dir := t.TempDir()
	remote := filepath.Join(dir, "remote.raw")
	if err := os.WriteFile(remote, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(remote, 64<<20); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "remote.sock")
	srv := exec.Command(qemuNBD, "-f", "raw", "--persistent", "-k", sock, remote)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
	oracle.WaitListening(t, sock, 10*time.Second)
	d := startDaemon(t, bin, "")
	d.waitAnswering()
	uri := d.attachURI("0", "nbd:nbd+unix:///?socket="+sock, "xvdc", "w")
	out := runTool(t, fio, "--name=remote", "--ioengine=nbd", "--uri="+uri, "--rw=randwrite",
		"--bs=4k", "--iodepth=16", "--size=16M", "--verify=crc32c", "--verify_fatal=1",
		"--verify_state_save=0", "--output-format=terse")
	if strings.Contains(out, "verify:") || strings.Contains(out, "bad magic") {
		t.Fatalf("fio verify: %s", out)
	}
	if _, err := d.blktap("detach", "0", "xvdc"); err != nil {
		t.Fatal(err)
	}
	// What fio wrote through us is in the remote file.
	runTool(t, qemuImg, "compare", "-f", "raw", "-F", "raw", "nbd+unix:///?socket="+sock, remote)
	st, err := os.Stat(remote)
	if err != nil {
		t.Fatal(err)
	}
	if du := diskUsage(st); du < 8<<20 {
		t.Fatalf("remote file holds %d bytes of data after 16M of writes", du)
	}
}

// The export's block status through a backing chain: nbdinfo --map shows
// what qemu-img map shows, and qemu:allocation-depth the layers.
func TestEndToEndMapThroughChain(t *testing.T) {
	nbdinfo := oracle.Require(t, "nbdinfo")
	qemuImg := oracle.Require(t, "qemu-img")
	qemuIO := oracle.Require(t, "qemu-io")
	bin := buildBinary(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	top := filepath.Join(dir, "top.qcow")
	runTool(t, qemuImg, "create", "-f", "raw", base, "16M")
	runTool(t, qemuIO, "-f", "raw", base, "-c", "write -P 0x0b 4M 1M")
	runTool(t, qemuImg, "create", "-f", "qcow", "-b", base, "-F", "raw", top)
	runTool(t, qemuIO, "-f", "qcow", top, "-c", "write -P 0x70 0 1M")
	d := startDaemon(t, bin, "")
	d.waitAnswering()
	uri := d.attachURI("0", "qcow:"+top, "xvdc", "r")

	depth := runTool(t, nbdinfo, "--map=qemu:allocation-depth", uri)
	// offset length depth-code description: 1 = this image, 2 = backing
	for _, want := range []string{"0     1048576    1  local", "4194304     1048576    2  backing depth 2"} {
		if !strings.Contains(strings.Join(strings.Fields(depth), " "), strings.Join(strings.Fields(want), " ")) {
			t.Errorf("allocation depth lacks %q:\n%s", want, depth)
		}
	}
	alloc := runTool(t, nbdinfo, "--map", uri)
	ref := runTool(t, qemuImg, "map", "-f", "qcow", "--output=json", top)
	t.Logf("nbdinfo --map:\n%s\nqemu-img map:\n%s", alloc, ref)
	// Data where either layer holds it; the rest a hole.
	for _, want := range []string{"0 1048576 0 data", "4194304 1048576 0 data"} {
		if !strings.Contains(strings.Join(strings.Fields(alloc), " "), want) {
			t.Errorf("nbdinfo --map lacks %q:\n%s", want, alloc)
		}
	}
	if _, err := d.blktap("detach", "0", "xvdc"); err != nil {
		t.Fatal(err)
	}
}
