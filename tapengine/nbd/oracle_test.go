package nbd

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/internal/nbdwire"
	"github.com/blktap-go/blktap/internal/oracle"
)

// These tests check the server against programs no one here wrote:
// libnbd's nbdinfo, nbdcopy and nbdsh, qemu-io, qemu-img and fio.

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := runErr(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func runErr(name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

type nbdinfoExport struct {
	Name         string   `json:"export-name"`
	Description  string   `json:"description"`
	Contexts     []string `json:"contexts"`
	ReadOnly     bool     `json:"is_read_only"`
	Rotational   bool     `json:"is_rotational"`
	CanCache     bool     `json:"can_cache"`
	CanDF        bool     `json:"can_df"`
	CanFastZero  bool     `json:"can_fast_zero"`
	CanFlush     bool     `json:"can_flush"`
	CanFUA       bool     `json:"can_fua"`
	CanMultiConn bool     `json:"can_multi_conn"`
	CanTrim      bool     `json:"can_trim"`
	CanZero      bool     `json:"can_zero"`
	BlockMin     int64    `json:"block_size_minimum"`
	BlockPref    int64    `json:"block_size_preferred"`
	BlockMax     int64    `json:"block_size_maximum"`
	Size         int64    `json:"export-size"`
}

type nbdinfoOut struct {
	Protocol   string          `json:"protocol"`
	Structured bool            `json:"structured"`
	Exports    []nbdinfoExport `json:"exports"`
}

func nbdinfoJSON(t *testing.T, args ...string) nbdinfoOut {
	t.Helper()
	out := run(t, oracle.Require(t, "nbdinfo"), append([]string{"--json"}, args...)...)
	var info nbdinfoOut
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo output: %v\n%s", err, out)
	}
	return info
}

func TestNbdinfoJSON(t *testing.T) {
	be, _ := newFileBackend(t, 64<<20+512)
	_, _, uri := startServer(t, Export{Name: "disk", Description: "test disk", Backend: be})
	info := nbdinfoJSON(t, uri)
	if info.Protocol != "newstyle-fixed" || !info.Structured || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo: %+v", info)
	}
	got := info.Exports[0]
	want := nbdinfoExport{
		Name: "disk", Description: "test disk",
		Contexts: []string{"base:allocation", "qemu:allocation-depth"},
		CanCache: true, CanDF: true, CanFastZero: true, CanFlush: true, CanFUA: true,
		CanMultiConn: true, CanTrim: true, CanZero: true,
		BlockMin: 1, BlockPref: 4096, BlockMax: 32 << 20, Size: 64<<20 + 512,
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("nbdinfo export\n got %+v\nwant %+v", got, want)
	}
}

func TestNbdinfoReadOnly(t *testing.T) {
	be, _ := newFileBackend(t, 1<<20)
	_, _, uri := startServer(t, Export{Name: "ro", Backend: be, ReadOnly: true, NoMultiConn: true})
	got := nbdinfoJSON(t, uri).Exports[0]
	if !got.ReadOnly || got.CanTrim || got.CanZero || got.CanFastZero || got.CanMultiConn || !got.CanFlush {
		t.Errorf("read-only export flags: %+v", got)
	}
}

func TestNbdinfoList(t *testing.T) {
	be, _ := newFileBackend(t, 1<<20)
	_, sock, _ := startServer(t, Export{Name: "listed", Description: "a listed disk", Backend: be})
	info := nbdinfoJSON(t, "--list", "nbd+unix:///?socket="+sock)
	if len(info.Exports) != 1 || info.Exports[0].Name != "listed" || info.Exports[0].Description != "a listed disk" ||
		info.Exports[0].Size != 1<<20 {
		t.Errorf("nbdinfo --list: %+v", info)
	}
	// The default export name reaches the same disk; another does not.
	if got := nbdinfoJSON(t, "nbd+unix:///?socket="+sock).Exports[0].Size; got != 1<<20 {
		t.Errorf("default export size %d", got)
	}
	if out, err := runErr("nbdinfo", "nbd+unix:///nosuch?socket="+sock); err == nil {
		t.Errorf("nbdinfo of an unknown export succeeded:\n%s", out)
	}
}

func TestQemuIOPattern(t *testing.T) {
	qemuIO := oracle.Require(t, "qemu-io")
	be, path := newFileBackend(t, 16<<20)
	_, _, uri := startServer(t, Export{Name: "disk", Backend: be})
	out := run(t, qemuIO, "-f", "raw", uri, "-c", "write -P 0xa5 1M 4M", "-c", "read -P 0xa5 1M 4M",
		"-c", "read -P 0 0 1M", "-c", "write -z 2M 64k", "-c", "read -P 0 2M 64k", "-c", "flush")
	if strings.Contains(out, "fail") || strings.Contains(out, "error") {
		t.Fatalf("qemu-io:\n%s", out)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for i, b := range raw {
		want := byte(0)
		if i >= 1<<20 && i < 5<<20 && !(i >= 2<<20 && i < 2<<20+64<<10) {
			want = 0xa5
		}
		if b != want {
			t.Fatalf("file byte %d = %#x, want %#x", i, b, want)
		}
	}
	// A wrong pattern must be caught, or the check above proves nothing.
	if out, _ := runErr(qemuIO, "-f", "raw", uri, "-c", "read -P 0x5a 1M 4k"); !strings.Contains(out, "Pattern verification failed") {
		t.Errorf("qemu-io accepted a wrong pattern:\n%s", out)
	}
}

// fillRandom writes random runs into f, leaving holes between them.
func fillRandom(t *testing.T, path string, size int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 256<<10)
	for off := int64(0); off < size; off += 1 << 20 {
		rand.Read(buf)
		if _, err := f.WriteAt(buf[:min(int64(len(buf)), size-off)], off); err != nil {
			t.Fatal(err)
		}
	}
}

func TestQemuImgCompare(t *testing.T) {
	qemuImg := oracle.Require(t, "qemu-img")
	be, path := newFileBackend(t, 8<<20)
	fillRandom(t, path, 8<<20)
	_, _, uri := startServer(t, Export{Name: "disk", Backend: be})
	run(t, qemuImg, "compare", "-f", "raw", "-F", "raw", path, uri)
	// And a file that differs by one byte is reported as different.
	other := filepath.Join(t.TempDir(), "other.raw")
	raw, _ := os.ReadFile(path)
	raw[5<<20+7] ^= 1
	os.WriteFile(other, raw, 0o600)
	if out, err := runErr(qemuImg, "compare", "-f", "raw", "-F", "raw", other, uri); err == nil {
		t.Errorf("qemu-img compare found no difference:\n%s", out)
	}
}

func TestNbdcopyBothWays(t *testing.T) {
	nbdcopy := oracle.Require(t, "nbdcopy")
	const size = 24 << 20
	be, path := newFileBackend(t, size)
	s, _, uri := startServer(t, Export{Name: "disk", Backend: be})
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	fillRandom(t, src, size)
	run(t, nbdcopy, "--flush", src, uri)
	a, _ := os.ReadFile(src)
	b, _ := os.ReadFile(path)
	if !bytes.Equal(a, b) {
		t.Fatal("export differs from the source after nbdcopy file -> nbd")
	}
	// Change the backing file behind the server's back, then copy out.
	fillRandom(t, path, size)
	dst := filepath.Join(dir, "dst.raw")
	run(t, nbdcopy, uri, dst)
	a, _ = os.ReadFile(path)
	b, _ = os.ReadFile(dst)
	if !bytes.Equal(a, b) {
		t.Fatal("copy differs from the export after nbdcopy nbd -> file")
	}
	if st := s.Stats(); st.Writes == 0 || st.Reads == 0 || st.Flushes == 0 || st.Connections < 2 {
		t.Errorf("stats after nbdcopy: %+v", st)
	}
}

// corruptBackend flips a bit in everything read: fio must notice.
type corruptBackend struct{ *fileBackend }

func (b corruptBackend) ReadAt(p []byte, off int64) (int, error) {
	n, err := b.fileBackend.ReadAt(p, off)
	if n > 100 {
		p[100] ^= 0x10
	}
	return n, err
}

func TestFioVerify(t *testing.T) {
	fio := oracle.Require(t, "fio")
	be, _ := newFileBackend(t, 64<<20)
	_, _, uri := startServer(t, Export{Name: "disk", Backend: be})
	// Four jobs, four connections (multi-conn), each verifying its own
	// quarter of the disk.
	out := run(t, fio, fioArgs(uri)...)
	var res struct {
		Jobs []struct {
			Error int `json:"error"`
			Read  struct {
				IOs int64 `json:"total_ios"`
			} `json:"read"`
			Write struct {
				IOs int64 `json:"total_ios"`
			} `json:"write"`
		} `json:"jobs"`
	}
	i := strings.Index(out, "{")
	if i < 0 || json.Unmarshal([]byte(out[i:]), &res) != nil || len(res.Jobs) == 0 {
		t.Fatalf("fio output:\n%s", out)
	}
	for _, j := range res.Jobs {
		if j.Error != 0 || j.Read.IOs == 0 || j.Write.IOs == 0 {
			t.Errorf("fio job: %+v\n%s", j, out)
		}
	}

	// The same run against a server that corrupts reads must fail, or
	// the run above verified nothing.
	be2, _ := newFileBackend(t, 64<<20)
	_, _, uri2 := startServer(t, Export{Name: "bad", Backend: corruptBackend{be2}})
	if out, err := runErr(fio, fioArgs(uri2)...); err == nil {
		t.Errorf("fio verify passed against a corrupting server:\n%s", out)
	}
}

func fioArgs(uri string) []string {
	return []string{"--name=nbdverify", "--ioengine=nbd", "--uri=" + uri,
		"--rw=randrw", "--bs=4k", "--iodepth=16", "--numjobs=4", "--size=16M", "--offset_increment=16M",
		"--io_size=24M", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--group_reporting", "--output-format=json"}
}

// nbdsh runs a Python script from testdata under nbdsh with env set.
func nbdsh(t *testing.T, script string, env ...string) string {
	t.Helper()
	bin := oracle.Require(t, "nbdsh")
	src, err := os.ReadFile(filepath.Join("testdata", script))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-c", string(src))
	cmd.Env = append(os.Environ(), env...)
	if _, err := os.Stat("/usr/bin/python3"); err == nil {
		// nbdsh runs "python3 -mnbd"; where PATH finds another Python
		// first (pyenv) that lacks Debian's nbd module, put the system
		// interpreter it was packaged for first.
		cmd.Env = append(cmd.Env, "PATH=/usr/bin:"+os.Getenv("PATH"))
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("nbdsh %s: %v\n%s", script, err, out)
	}
	return string(out)
}

func TestNbdshErrorPaths(t *testing.T) {
	be, _ := newFileBackend(t, 4<<20)
	_, _, uri := startServer(t, Export{Name: "rw", Backend: be})
	rob, _ := newFileBackend(t, 1<<20)
	_, _, roURI := startServer(t, Export{Name: "ro", Backend: rob, ReadOnly: true})
	if out := nbdsh(t, "errors.py", "URI="+uri, "RO_URI="+roURI); !strings.Contains(out, "ok") {
		t.Errorf("nbdsh errors.py:\n%s", out)
	}
}

// The same nbdsh transcript of every command and flag from our export
// and from qemu-nbd serving an identical copy of the image.
func TestNbdshSameAnswersAsQemuNbd(t *testing.T) {
	qemuNbd := oracle.Require(t, "qemu-nbd")
	const size = 8 << 20
	be, path := newFileBackend(t, size)
	fillRandom(t, path, size)
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	copyPath := filepath.Join(dir, "copy.raw")
	if err := os.WriteFile(copyPath, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	_, _, ours := startServer(t, Export{Name: "", Backend: be})
	sock := filepath.Join(dir, "qemu.sock")
	stop := spawn(t, sock, qemuNbd, "-f", "raw", "-t", "--discard=unmap", "-k", sock, copyPath)
	defer stop()
	a := nbdsh(t, "commands.py", "URI="+ours)
	b := nbdsh(t, "commands.py", "URI=nbd+unix:///?socket="+sock)
	t.Logf("transcript (ours):\n%s", a)
	// One deliberate difference: proto.md says a write or write-zeroes
	// past the end SHOULD get ENOSPC; qemu-nbd (7.2) answers EINVAL.
	for _, op := range []string{"write past end", "zero past end"} {
		b = strings.ReplaceAll(b, `["`+op+`", "error EINVAL"]`, `["`+op+`", "error ENOSPC"]`)
	}
	if a != b {
		al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
		for i := 0; i < max(len(al), len(bl)); i++ {
			var x, y string
			if i < len(al) {
				x = al[i]
			}
			if i < len(bl) {
				y = bl[i]
			}
			if x != y {
				t.Errorf("line %d: ours %s, qemu-nbd %s", i, x, y)
			}
		}
	}
	// And the images end up identical.
	a2, _ := os.ReadFile(path)
	b2, _ := os.ReadFile(copyPath)
	if !bytes.Equal(a2, b2) {
		t.Error("images differ after the same commands")
	}
}

type mapEntry struct {
	Offset, Length int64
	Data           bool
}

// merge joins adjacent entries of the same kind.
func merge(es []mapEntry) []mapEntry {
	var out []mapEntry
	for _, e := range es {
		if k := len(out); k > 0 && out[k-1].Data == e.Data && out[k-1].Offset+out[k-1].Length == e.Offset {
			out[k-1].Length += e.Length
			continue
		}
		out = append(out, e)
	}
	return out
}

// nbdinfo --map of the export shows the holes and data that qemu-img map
// finds in the same file.
func TestNbdinfoMapMatchesQemuImgMap(t *testing.T) {
	nbdinfo := oracle.Require(t, "nbdinfo")
	qemuImg := oracle.Require(t, "qemu-img")
	const size = 8 << 20
	be, path := newFileBackend(t, size)
	fillRandom(t, path, size)
	if err := be.Discard(1<<20, 64<<10); err != nil { // a hole inside data
		t.Fatal(err)
	}
	_, _, uri := startServer(t, Export{Name: "disk", Backend: be})

	var nb []struct {
		Offset int64 `json:"offset"`
		Length int64 `json:"length"`
		Type   int   `json:"type"`
	}
	if err := json.Unmarshal([]byte(run(t, nbdinfo, "--map", "--json", uri)), &nb); err != nil {
		t.Fatal(err)
	}
	var qm []struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Data   bool  `json:"data"`
	}
	if err := json.Unmarshal([]byte(run(t, qemuImg, "map", "--output=json", "-f", "raw", path)), &qm); err != nil {
		t.Fatal(err)
	}
	var a, b []mapEntry
	for _, e := range nb {
		a = append(a, mapEntry{e.Offset, e.Length, e.Type&nbdwire.StateHole == 0})
	}
	for _, e := range qm {
		b = append(b, mapEntry{e.Start, e.Length, e.Data})
	}
	a, b = merge(a), merge(b)
	if len(a) < 3 || fmt.Sprint(a) != fmt.Sprint(b) {
		t.Errorf("nbdinfo --map %v\nqemu-img map  %v", a, b)
	}
}

// --map=qemu:allocation-depth reports each run's layer in the chain.
func TestNbdinfoMapAllocationDepth(t *testing.T) {
	nbdinfo := oracle.Require(t, "nbdinfo")
	_, _, uri := startServer(t, Export{Name: "disk", Backend: layered{newMem(1 << 20)}})
	var nb []struct {
		Offset int64  `json:"offset"`
		Length int64  `json:"length"`
		Type   int    `json:"type"`
		Desc   string `json:"description"`
	}
	if err := json.Unmarshal([]byte(run(t, nbdinfo, "--map=qemu:allocation-depth", "--json", uri)), &nb); err != nil {
		t.Fatal(err)
	}
	got := fmt.Sprint(nb)
	want := fmt.Sprint([]struct {
		Offset int64
		Length int64
		Type   int
		Desc   string
	}{
		{0, 64 << 10, 1, "local"}, {64 << 10, 64 << 10, 2, "backing depth 2"},
		{128 << 10, 64 << 10, 1, "local"}, {192 << 10, 1<<20 - 192<<10, 0, "absent"},
	})
	if got != want {
		t.Errorf("allocation depth map\n got %s\nwant %s", got, want)
	}
}

// TestFioVerifyLargeBlocks: fio writes 64 KiB-1 MiB blocks with crc32c
// headers and reads them back, the paths above inlineMax (workers, the
// big-request budget); a verify-only run passes on the same bytes and
// must fail once bytes are changed in the file behind the server, or the
// first run proved nothing.
func TestFioVerifyLargeBlocks(t *testing.T) {
	fio := oracle.Require(t, "fio")
	be, path := newFileBackend(t, 32<<20)
	s, _, uri := startServer(t, Export{Name: "disk", Backend: be})
	args := []string{"--name=bigverify", "--ioengine=nbd", "--uri=" + uri,
		"--rw=randwrite", "--bsrange=64k-1m", "--blockalign=4k", "--iodepth=8",
		"--size=32M", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--randseed=7"}
	run(t, fio, args...)
	if st := s.Stats(); st.BytesRead < 8<<20 || st.BytesWritten < 32<<20 {
		t.Fatalf("fio read %d and wrote %d bytes: too few to have verified much", st.BytesRead, st.BytesWritten)
	}
	run(t, fio, append(args, "--verify_only")...)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 4096)
	for off := int64(0); off < 32<<20; off += 1 << 20 {
		f.ReadAt(b, off+8192)
		for i := range b {
			b[i] ^= 0xa5
		}
		f.WriteAt(b, off+8192)
	}
	if out, err := runErr(fio, append(args, "--verify_only")...); err == nil {
		t.Fatalf("fio verified a file changed behind the server:\n%s", out)
	}
}
