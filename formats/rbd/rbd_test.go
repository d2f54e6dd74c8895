//go:build rbd

package rbd

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/internal/cephdev"
	"github.com/blktap-go/blktap/internal/oracle"
)

func TestMain(m *testing.M) {
	if spec := os.Getenv("BLKTAP_RBD_HOLDER"); spec != "" {
		holdAndWrite(spec)
		return
	}
	code := m.Run()
	cephdev.Stop()
	os.Exit(code)
}

// holdAndWrite is a second client in its own process: it opens spec for
// writing, says "locked", then writes block 0 every 100 ms, reporting
// each result, until a write fails.
func holdAndWrite(spec string) {
	img, err := Open(spec, Options{})
	if err != nil {
		fmt.Println("open error:", err)
		os.Exit(1)
	}
	fmt.Println("locked")
	buf := bytes.Repeat([]byte{0xee}, 4096)
	for i := 0; ; i++ {
		if _, err := img.WriteAt(buf, 0); err != nil {
			fmt.Println("write error:", err)
			os.Exit(0)
		}
		fmt.Println("wrote", i)
		time.Sleep(100 * time.Millisecond)
	}
}

func newImage(t *testing.T, size int64) (*cephdev.Cluster, string, string) {
	t.Helper()
	c := cephdev.Get(t)
	name, spec := c.Name(t)
	if err := Create(spec, CreateOptions{Size: size}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { exec.Command("rbd", "-c", c.Conf, "rm", "--no-progress", "rbd/"+name).Run() })
	return c, name, spec
}

func TestReadWriteDiscardMap(t *testing.T) {
	c, name, spec := newImage(t, 64<<20)
	if err := Create(spec, CreateOptions{Size: 1 << 20}); !errors.Is(err, os.ErrExist) {
		t.Fatalf("second Create: %v, want ErrExist", err)
	}
	im, err := Open(spec, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if im.Size() != 64<<20 {
		t.Fatalf("size %d", im.Size())
	}
	a := bytes.Repeat([]byte{0xab}, 64<<10)
	if _, err := im.WriteAt(a, 8<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(a[:512], 64<<20-512); err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(a[:512], 64<<20-511); !errors.Is(err, image.ErrOutOfRange) {
		t.Fatalf("write past the end: %v", err)
	}
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(a))
	if _, err := im.ReadAt(got, 8<<20); err != nil || !bytes.Equal(got, a) {
		t.Fatalf("read back: %v, equal %v", err, bytes.Equal(got, a))
	}
	mapCoversWrites(t, im)
	// A discard of part of an object reads as zeros (rbd_skip_partial_discard off).
	if err := im.Discard(8<<20+4096, 8192); err != nil {
		t.Fatal(err)
	}
	if err := im.(*Image).WriteZeroes(8<<20+16384, 4096, false); err != nil {
		t.Fatal(err)
	}
	want := append([]byte(nil), a...)
	clear(want[4096 : 4096+8192])
	clear(want[16384 : 16384+4096])
	if _, err := im.ReadAt(got, 8<<20); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("after discard and write zeroes: %v, equal %v", err, bytes.Equal(got, want))
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	// The rbd tool reads what we wrote.
	b := exportImage(t, c, name)
	if !bytes.Equal(b[8<<20:8<<20+len(want)], want) || !bytes.Equal(b[64<<20-512:], a[:512]) {
		t.Fatal("rbd export differs from what we wrote")
	}
	// Read-only opens refuse writes.
	ro, err := Open(spec, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if _, err := ro.WriteAt(a[:512], 0); !errors.Is(err, image.ErrReadOnly) {
		t.Fatalf("write to a read-only open: %v", err)
	}
}

// mapCoversWrites: fast-diff reports whole objects: data may cover more
// than TestReadWriteDiscardMap wrote, but must cover every write.
func mapCoversWrites(t *testing.T, im image.Image) {
	ext, err := im.Map(0, im.Size())
	if err != nil {
		t.Fatal(err)
	}
	covered := func(off, n int64) bool {
		for _, e := range ext {
			if e.Kind == image.Data && e.Offset <= off && off+n <= e.Offset+e.Length {
				return true
			}
		}
		return false
	}
	var data int64
	for _, e := range ext {
		if e.Kind == image.Data {
			data += e.Length
		}
	}
	if !covered(8<<20, 64<<10) || !covered(64<<20-512, 512) || data > 8<<20 {
		t.Errorf("map: %d bytes of data in %v", data, ext)
	}
}

// TestForeignWritersRead: we read what the rbd tool and qemu wrote, and
// qemu reads what we wrote.
func TestForeignWriters(t *testing.T) {
	c := cephdev.Get(t)
	name, spec := c.Name(t)
	src := filepath.Join(t.TempDir(), "src")
	pattern := bytes.Repeat([]byte("blktap-rbd-"), 100000)[:1<<20]
	if err := os.WriteFile(src, pattern, 0o644); err != nil {
		t.Fatal(err)
	}
	c.RBD(t, "import", "--no-progress", src, "rbd/"+name)
	t.Cleanup(func() { exec.Command("rbd", "-c", c.Conf, "rm", "--no-progress", "rbd/"+name).Run() })
	im, err := Open(spec, Options{})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(pattern))
	if _, err := im.ReadAt(got, 0); err != nil || !bytes.Equal(got, pattern) {
		t.Fatalf("read of an rbd import: %v, equal %v", err, bytes.Equal(got, pattern))
	}
	if _, err := im.WriteAt(bytes.Repeat([]byte{0x5a}, 4096), 65536); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	qemuIO := oracle.Require(t, "qemu-io")
	uri := "rbd:rbd/" + name + ":conf=" + c.Conf
	out, err := exec.Command(qemuIO, "-f", "raw", "-c", "read -P 0x5a 65536 4096", "-c", "write -P 0x33 131072 4096", uri).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "read 4096/4096") || strings.Contains(string(out), "Pattern verification failed") {
		t.Fatalf("qemu-io on %s: %v\n%s", uri, err, out)
	}
	im, err = Open(spec, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if _, err := im.ReadAt(got[:4096], 131072); err != nil || !bytes.Equal(got[:4096], bytes.Repeat([]byte{0x33}, 4096)) {
		t.Fatalf("read of qemu-io's write: %v", err)
	}
}

func TestSnapshotReadOnly(t *testing.T) {
	c, name, spec := newImage(t, 4<<20)
	im, err := Open(spec, Options{})
	if err != nil {
		t.Fatal(err)
	}
	old := bytes.Repeat([]byte{1}, 4096)
	if _, err := im.WriteAt(old, 0); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	c.RBD(t, "snap", "create", "rbd/"+name+"@s1")
	t.Cleanup(func() { exec.Command("rbd", "-c", c.Conf, "snap", "purge", "--no-progress", "rbd/"+name).Run() })
	if im, err = Open(spec, Options{}); err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(bytes.Repeat([]byte{2}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	im.Close()
	snapSpec := strings.Replace(spec, name, name+"@s1", 1)
	snap, err := Open(snapSpec, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Close()
	got := make([]byte, 4096)
	if _, err := snap.ReadAt(got, 0); err != nil || !bytes.Equal(got, old) {
		t.Fatalf("snapshot read: %v, got %x...", err, got[:4])
	}
	if _, err := snap.WriteAt(got, 0); !errors.Is(err, image.ErrReadOnly) {
		t.Fatalf("write to a snapshot: %v", err)
	}
}

// TestOneWriter: a second writer is refused, naming the first, until the
// first closes.
func TestOneWriter(t *testing.T) {
	_, _, spec := newImage(t, 4<<20)
	a, err := Open(spec, Options{})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = Open(spec, Options{})
	var le *LockedError
	if !errors.As(err, &le) || !errors.Is(err, ErrLocked) {
		t.Fatalf("second writer: %v, want a LockedError", err)
	}
	host, _ := os.Hostname()
	if !strings.Contains(err.Error(), "host "+host) || !strings.Contains(err.Error(), fmt.Sprintf("pid %d", os.Getpid())) {
		t.Errorf("the error does not name the holder's client and host: %v", err)
	}
	t.Logf("refused in %v: %v", time.Since(start).Round(time.Millisecond), err)
	// A reader is not a writer: it opens.
	r, err := Open(spec, Options{ReadOnly: true})
	if err != nil {
		t.Fatalf("reader beside a writer: %v", err)
	}
	r.Close()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := Open(spec, Options{})
	if err != nil {
		t.Fatalf("writer after the first closed: %v", err)
	}
	b.Close()
}

// TestStalledHolderFenced: a holder that stops answering (SIGSTOP: a hung
// or partitioned host) loses the lock only through blocklisting, so when
// it wakes up its writes fail: never two writers.
func TestStalledHolderFenced(t *testing.T) {
	c, _, spec := newImage(t, 4<<20)
	holder, lines, holderErr := startHolder(t, spec)
	defer holder.Process.Kill()
	waitLine(t, lines, "wrote 2", 60*time.Second)
	if err := holder.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	var b image.Image
	var err error
	for {
		b, err = Open(spec, Options{})
		if err == nil {
			break
		}
		if !errors.Is(err, ErrLocked) || time.Since(stopped) > 90*time.Second {
			t.Fatalf("taking over from a stalled holder: %v", err)
		}
		time.Sleep(time.Second)
	}
	t.Logf("took the lock %v after the holder stalled", time.Since(stopped).Round(time.Second))
	defer b.Close()
	blocklist, _ := exec.Command("ceph", "-c", c.Conf, "osd", "blocklist", "ls").CombinedOutput()
	t.Logf("blocklist: %s", strings.TrimSpace(string(blocklist)))
	mine := bytes.Repeat([]byte{0x77}, 4096)
	if _, err := b.WriteAt(mine, 0); err != nil {
		t.Fatal(err)
	}
	holder.Process.Signal(syscall.SIGCONT)
	// Whatever the woken holder tries, block 0 stays ours.
	deadline := time.After(60 * time.Second)
	for done := false; !done; {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Logf("the woken holder exited: %v\n%s", holder.Wait(), lastLines(holderErr.String(), 5))
				done = true
			} else if strings.HasPrefix(l, "write error") {
				t.Logf("woken holder: %s", l)
				done = true
			}
		case <-deadline:
			t.Fatal("the woken holder neither failed nor exited")
		}
	}
	got := make([]byte, 4096)
	if _, err := b.ReadAt(got, 0); err != nil || !bytes.Equal(got, mine) {
		t.Fatalf("block 0 after the old holder woke: %v, %x...", err, got[:4])
	}
}

// startHolder runs holdAndWrite in a child process on spec; its lines
// arrive on the channel, closed when it exits.
func startHolder(t *testing.T, spec string) (*exec.Cmd, <-chan string, *bytes.Buffer) {
	t.Helper()
	holder := exec.Command(os.Args[0], "-test.run=^$")
	holder.Env = append(os.Environ(), "BLKTAP_RBD_HOLDER="+spec)
	stdout, err := holder.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	holder.Stderr = &stderr
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 1000)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	return holder, lines, &stderr
}

func waitLine(t *testing.T, lines <-chan string, want string, within time.Duration) {
	t.Helper()
	deadline := time.After(within)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("the holder exited before %q", want)
			}
			if strings.HasPrefix(l, "open error") {
				t.Fatalf("holder: %s", l)
			}
			if l == want {
				return
			}
		case <-deadline:
			t.Fatalf("no %q from the holder in %v", want, within)
		}
	}
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(l[max(0, len(l)-n):], "\n")
}

// TestDeadLocalHolderBroken: a writer on this host killed -9 (a worker
// the daemon restarts) does not hold the image for the OSDs' watch
// timeout: the next writer here sees the holder's process is gone and
// breaks the lock at once, blocklisting the dead client.
func TestDeadLocalHolderBroken(t *testing.T) {
	_, _, spec := newImage(t, 4<<20)
	holder, lines, _ := startHolder(t, spec)
	waitLine(t, lines, "wrote 1", 60*time.Second)
	holder.Process.Kill()
	holder.Wait()
	start := time.Now()
	b, err := Open(spec, Options{})
	if err != nil {
		t.Fatalf("open after the holder was killed: %v", err)
	}
	defer b.Close()
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("took the lock of a dead local holder in %v, want it at once", took)
	}
}
