package main

import (
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/internal/oracle"
	"golang.org/x/sys/unix"
)

// resizeImages makes the images the resize comparison starts from, each
// with data written by qemu-io: file name, format, -o options, backing.
var resizeImages = []struct{ name, fmt, opts, backing string }{
	{"r.raw", "raw", "", ""},
	{"v3.qcow2", "qcow2", "", ""},
	{"v2.qcow2", "qcow2", "compat=0.10", ""},
	{"cs512.qcow2", "qcow2", "cluster_size=512", ""},
	{"over.qcow2", "qcow2", "cluster_size=4096", "base.raw"},
	{"snap3.qcow2", "qcow2", "", ""},
	{"snap2.qcow2", "qcow2", "compat=0.10", ""},
	{"c.qcow", "qcow", "", ""},
	{"k.vmdk", "vmdk", "", ""},
}

// qemu-img resize and image resize on copies of the same files: the same
// exit status (0 or not), the same stdout, and images qemu-img reads as
// equal (info's virtual size, check clean, compare identical).
func TestQemuImgResizeOracle(t *testing.T) {
	bin, qimg, qio, dir := withBase(t, "8M")
	cmds := [][]string{
		{"4M"}, {"+3M"}, {"512K"}, {"--shrink", "512K"}, {"--shrink", "-256K"},
		{"-q", "8M"}, {"--shrink", "1000"}, {"+0"}, {"--shrink", "1536K"},
	}
	for _, im := range resizeImages {
		for _, cmd := range cmds {
			name := im.name + "/" + strings.Join(cmd, "_")
			t.Run(name, func(t *testing.T) {
				sub := t.TempDir()
				for _, who := range []string{"qemu", "ours"} {
					args := []string{"create", "-q", "-f", im.fmt}
					if im.opts != "" {
						args = append(args, "-o", im.opts)
					}
					if im.backing != "" {
						args = append(args, "-b", filepath.Join(dir, im.backing), "-F", "raw")
					}
					mustRun(t, sub, qimg, append(args, who+"-"+im.name, "1M")...)
					mustRun(t, sub, qio, "-f", im.fmt, "-c", "write -P 0xa5 64K 900K", who+"-"+im.name)
					if strings.HasPrefix(im.name, "snap") {
						mustRun(t, sub, qimg, "snapshot", "-c", "s1", who+"-"+im.name)
					}
				}
				qa := append([]string{"resize", "-f", im.fmt}, cmd[:len(cmd)-1]...)
				qo, qe, qrc := runIn(t, sub, qimg, append(qa, "qemu-"+im.name, cmd[len(cmd)-1])...)
				oa := append([]string{"image", "resize", "-f", im.fmt}, cmd[:len(cmd)-1]...)
				oo, oe, orc := runIn(t, sub, bin, append(oa, "ours-"+im.name, cmd[len(cmd)-1])...)
				if (qrc == 0) != (orc == 0) || qo != oo {
					t.Fatalf("qemu-img: exit %d %q %q\nours: exit %d %q %q", qrc, qo, qe, orc, oo, oe)
				}
				if qrc != 0 {
					return
				}
				qs, os := resizedSize(t, sub, qimg, im.fmt, "qemu-"+im.name), resizedSize(t, sub, qimg, im.fmt, "ours-"+im.name)
				if qs != os {
					t.Fatalf("virtual size: qemu-img %d, ours %d", qs, os)
				}
				if im.fmt == "qcow2" {
					mustRun(t, sub, qimg, "check", "ours-"+im.name)
					// Ours reads qemu's result as qemu-img does.
					mustRun(t, sub, bin, "image", "check", "qemu-"+im.name)
				}
				mustRun(t, sub, qimg, "compare", "-f", im.fmt, "-F", im.fmt, "qemu-"+im.name, "ours-"+im.name)
				mustRun(t, sub, bin, "image", "compare", "-f", im.fmt, "-F", im.fmt, "qemu-"+im.name, "ours-"+im.name)
			})
		}
	}
}

// withBase builds our binary, finds qemu-img and qemu-io, and makes a
// directory holding base.raw, a backing file of size filled with 0xee.
func withBase(t *testing.T, size string) (bin, qimg, qio, dir string) {
	bin, qimg, qio = qemuTools(t)
	dir = t.TempDir()
	mustRun(t, dir, qimg, "create", "-q", "-f", "raw", "base.raw", size)
	mustRun(t, dir, qio, "-f", "raw", "-c", "write -P 0xee 0 "+size, "base.raw")
	return bin, qimg, qio, dir
}

func resizedSize(t *testing.T, dir, qimg, format, name string) int64 {
	t.Helper()
	so, se, rc := runIn(t, dir, qimg, "info", "-f", format, "--output=json", name)
	if rc != 0 {
		t.Fatalf("qemu-img info %s: %s", name, se)
	}
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(so), &info); err != nil {
		t.Fatal(err)
	}
	return info.VirtualSize
}

// An image qemu (or a worker) has open is not resized, raw or qcow2.
func TestImageResizeInUse(t *testing.T) {
	bin := imageBinary(t)
	qimg := oracle.Require(t, "qemu-img")
	qio := oracle.Require(t, "qemu-io")
	dir := t.TempDir()
	for _, f := range []string{"raw", "qcow2"} {
		name := "busy." + f
		mustRun(t, dir, qimg, "create", "-q", "-f", f, name, "1M")
		holder := exec.Command(qio, "-f", f, name)
		holder.Dir = dir
		stdin, err := holder.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		stdout, err := holder.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := holder.Start(); err != nil {
			t.Fatal(err)
		}
		// qemu-io prompts once the image is open (and locked).
		prompt := make([]byte, 9)
		if _, err := io.ReadFull(stdout, prompt); err != nil || string(prompt) != "qemu-io> " {
			t.Fatalf("qemu-io did not open %s: %q %v", name, prompt, err)
		}
		_, se, rc := runIn(t, dir, bin, "image", "resize", "-f", f, name, "2M")
		stdin.Close()
		holder.Wait()
		if rc != 1 || !strings.Contains(se, "is in use") {
			t.Fatalf("%s held by qemu-io: exit %d %q, want 1 and \"is in use\"", f, rc, se)
		}
		if got := resizedSize(t, dir, qimg, f, name); got != 1<<20 {
			t.Fatalf("%s resized to %d while in use", f, got)
		}
	}
	// A worker holds a flock on every image it serves, whatever its
	// format (tapengine/worker): held here as the worker holds it.
	mustRun(t, dir, qimg, "create", "-q", "-f", "vpc", "served.vhd", "1M")
	held, err := os.Open(filepath.Join(dir, "served.vhd"))
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if err := unix.Flock(int(held.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"resize", "served.vhd", "2M"}, {"amend", "-o", "compat=0.10", "busy.qcow2"}} {
		if args[0] == "amend" {
			held.Close()
			if held, err = os.Open(filepath.Join(dir, "busy.qcow2")); err != nil {
				t.Fatal(err)
			}
			if err := unix.Flock(int(held.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
				t.Fatal(err)
			}
		}
		if _, se, rc := runIn(t, dir, bin, append([]string{"image"}, args...)...); rc != 1 || !strings.Contains(se, "is in use") {
			t.Fatalf("image %v on a flocked image: exit %d %q, want 1 and \"is in use\"", args, rc, se)
		}
	}
}

// VHD, which qemu-img cannot resize: ours grows and shrinks fixed disks
// and dynamic ones (past what their BAT can name too), and qemu-img and
// vhdiinfo read the new size; a size a CHS-sized (qemu-made) disk cannot
// express is refused.
func TestImageResizeVHD(t *testing.T) {
	bin, qimg, _, dir := withBase(t, "1M")
	vhdi := oracle.Require(t, "vhdiinfo")
	steps := []struct {
		create []string // blktap image create arguments, nil: keep the file
		resize []string
		ok     bool
		size   int64
	}{
		{[]string{"-f", "vhd", "-o", "subformat=fixed", "f.vhd", "1M"}, []string{"f.vhd", "3M"}, true, 3 << 20},
		{nil, []string{"--shrink", "f.vhd", "512K"}, true, 512 << 10},
		{[]string{"-f", "vhd", "d.vhd", "1M"}, []string{"d.vhd", "+1M"}, true, 2 << 20},
		{nil, []string{"d.vhd", "5M"}, true, 5 << 20}, // past the BAT's one entry
		{nil, []string{"--shrink", "d.vhd", "1536K"}, true, 1536 << 10},
	}
	for _, st := range steps {
		if st.create != nil {
			mustRun(t, dir, bin, append([]string{"image", "create"}, st.create...)...)
		}
		name := st.resize[len(st.resize)-2]
		_, se, rc := runIn(t, dir, bin, append([]string{"image", "resize"}, st.resize...)...)
		if (rc == 0) != st.ok {
			t.Fatalf("image resize %v: exit %d %s", st.resize, rc, se)
		}
		if got := resizedSize(t, dir, qimg, "vpc", name); got != st.size {
			t.Fatalf("after image resize %v: qemu-img reads %d bytes, want %d", st.resize, got, st.size)
		}
		if so, se, rc := runIn(t, dir, vhdi, name); rc != 0 || !strings.Contains(so, "("+strconv.FormatInt(st.size, 10)+" bytes)") {
			t.Fatalf("vhdiinfo after image resize %v: exit %d\n%s%s", st.resize, rc, so, se)
		}
	}
	mustRun(t, dir, qimg, "create", "-q", "-f", "vpc", "q.vhd", "1M")
	if _, se, rc := runIn(t, dir, bin, "image", "resize", "q.vhd", "2M"); rc != 1 || !strings.Contains(se, "CHS geometry") {
		t.Fatalf("resize of a CHS-sized disk: exit %d %q", rc, se)
	}
}

// A size starting with '-' is the size, not flags, wherever the command
// words stand; other commands' arguments are left alone.
func TestResizeArgs(t *testing.T) {
	cases := []struct{ in, want string }{
		{"image resize f -1G", "image resize f -- -1G"},
		{"--state-dir d image resize --shrink f -512K", "--state-dir d image resize --shrink f -- -512K"},
		{"image resize f -- -1G", "image resize f -- -1G"},
		{"image resize f +1G", "image resize f +1G"},
		{"image resize -q f 1G", "image resize -q f 1G"},
		{"image create f -1", "image create f -1"},
	}
	for _, c := range cases {
		if got := strings.Join(resizeArgs(strings.Fields(c.in)), " "); got != c.want {
			t.Errorf("resizeArgs(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}
