package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats/nbd"
	"github.com/blktap-go/blktap/internal/crashtest"
	"github.com/blktap-go/blktap/internal/oracle"
)

// The crash matrix (docs/CRASH.md): every writable format on both paths
// (the dom0 export and the guest view, which is the ring driven by the
// local frontend), a journaling writer on each, and SIGKILL of the
// workers, the daemon, or both, CRASH_ROUNDS rounds of each kind. After
// every kill the disks must come back holding every block a flush
// covered, and every acknowledged block too (a process death keeps the
// page cache, so nothing acknowledged may go); at the end the images must
// pass `blktap image check` and qemu-img check.
func TestEndToEndCrashMatrix(t *testing.T) {
	qemuImg := oracle.Require(t, "qemu-img")
	rounds := crashtest.Rounds(1)
	bin := buildBinary(t)
	dir := t.TempDir()
	disks, cfg := makeCrashDisks(t, bin, dir)
	names := make([]string, len(disks))
	for i, cd := range disks {
		names[i] = cd.name
	}
	d := startDaemon(t, bin, cfg)
	openCrashClients(t, d, disks, names)

	d, report := crashRounds(t, d, cfg, disks, names, rounds)
	finishCrashMatrix(t, d, disks, report, bin, qemuImg)
}

// openCrashClients connects an NBD client to every disk's export once
// all are connected.
func openCrashClients(t *testing.T, d *daemon, disks []*crashDisk, names []string) {
	t.Helper()
	rows := d.waitConnected(names...)
	for _, cd := range disks {
		cd.uri = rows[cd.name].Export
		// Long enough for any restart; a disk that does not come back
		// fails the test in waitBack first.
		img, err := nbd.Open(cd.uri, nbd.Options{Timeout: 90 * time.Second})
		if err != nil {
			t.Fatalf("%s: %v", cd.name, err)
		}
		cd.img = img
		// Close flushes; a test that failed with the daemon down must
		// not wait for it.
		t.Cleanup(func() { go img.Close() })
	}
}

// crashRounds kills the workers, the daemon and both, rounds times each,
// while every disk's journaling writer runs, and checks every disk's
// journal after each round. It returns the daemon serving now.
func crashRounds(t *testing.T, d *daemon, cfg string, disks []*crashDisk, names []string, rounds int) (*daemon, []string) {
	t.Helper()
	var report []string
	for _, kill := range []string{"worker", "daemon", "both"} {
		for round := range rounds {
			for _, cd := range disks {
				cd.start()
			}
			// The kill lands while every writer has writes and flushes
			// in flight, not in a quiet moment.
			waitProgress(t, disks, 20)
			killed := map[string]int{}
			if kill != "daemon" {
				for _, r := range d.ls() {
					killed[r.Name] = r.WorkerPid
				}
			}
			if kill != "worker" {
				if err := d.cmd.Process.Signal(syscall.SIGKILL); err != nil {
					t.Fatal(err)
				}
				<-d.done
			}
			for name, pid := range killed {
				if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
					t.Fatalf("kill the worker of %s (%d): %v", name, pid, err)
				}
			}
			began := time.Now()
			if kill != "worker" {
				d = restartDaemon(t, d, cfg)
			}
			rows := waitBack(t, d, names, killed)
			back := time.Since(began)
			for _, cd := range disks {
				if rows[cd.name].Export != cd.uri {
					t.Fatalf("%s: export moved from %s to %s across the restart", cd.name, cd.uri, rows[cd.name].Export)
				}
			}
			// Serving again: every writer gets more writes through.
			waitProgress(t, disks, 20)
			for _, cd := range disks {
				cd.stop()
			}
			for _, cd := range disks {
				v := cd.verify(t)
				cd.cells[kill] = cd.cells[kill].add(v)
			}
			report = append(report, fmt.Sprintf("%s kill, round %d: all %d disks back in %v", kill, round+1, len(disks), back.Round(time.Millisecond)))
		}
	}

	return d, report
}

// makeCrashDisks creates the matrix's images in dir, every writable format
// for domain 0 and for domain 1, and the desired-state file serving them.
func makeCrashDisks(t *testing.T, bin, dir string) (disks []*crashDisk, cfg string) {
	t.Helper()
	ramPrefix := fmt.Sprintf("crashm-%d-", os.Getpid())
	var y strings.Builder
	y.WriteString("disks:\n")
	for i, k := range crashKinds {
		for _, domain := range []int{0, 1} {
			cd := &crashDisk{name: fmt.Sprintf("%s-dom%d", k.name, domain), kind: k.name, format: k.format, qemu: k.qemu, guest: domain != 0}
			var image string
			image, cd.image = makeImage(t, bin, dir, cd.name, fmt.Sprintf("%s%d", ramPrefix, len(disks)), k)
			fmt.Fprintf(&y, "  - {name: %s, image: %q, format: %s, domain: %d, device: xvd%c}\n", cd.name, image, k.format, domain, 'b'+i)
			cd.seed = uint32(len(disks) + 1)
			cd.j = newJournal(crashSize / crashBlock)
			disks = append(disks, cd)
		}
	}
	cfg = filepath.Join(dir, "disks.yaml")
	if err := os.WriteFile(cfg, []byte(y.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return disks, cfg
}

// finishCrashMatrix shuts the daemon down, checks every image at rest and
// logs the tallies.
func finishCrashMatrix(t *testing.T, d *daemon, disks []*crashDisk, report []string, bin, qemuImg string) {
	t.Helper()
	// Images checked at rest, after a clean shutdown.
	for _, cd := range disks {
		cd.img.Close()
	}
	if _, err := d.blktap("shutdown", "--timeout", "60s"); err != nil {
		t.Fatal(err)
	}
	<-d.done
	for _, cd := range disks {
		if cd.image == "" {
			continue
		}
		// A kill may leak clusters (allocated, not yet referenced): that
		// wastes space and harms no data, and both checkers say so with
		// exit status 3. Anything else is a failure.
		cd.leaks = checkLeaks(t, cd.name, bin, "image", "check", "-f", cd.format, cd.image)
		if cd.qemu != "raw" && cd.qemu != "qcow" {
			checkLeaks(t, cd.name, qemuImg, "check", "-f", cd.qemu, cd.image)
		}
	}
	for _, line := range report {
		t.Log(line)
	}
	t.Logf("%-24s %-7s %5s %7s %9s %6s %6s", "disk", "kill", "kills", "writes", "verified", "losses", "bad")
	for _, cd := range disks {
		for _, kill := range []string{"worker", "daemon", "both"} {
			c := cd.cells[kill]
			t.Logf("%-24s %-7s %5d %7d %9d %6d %6d", cd.name, kill, c.kills, c.writes, c.verified, c.losses, c.bad)
		}
	}
	for _, cd := range disks {
		if cd.leaks != 0 {
			t.Logf("%s: image check at the end: %d leaked clusters", cd.name, cd.leaks)
		}
	}
}

// imageKind is one writable format as the crash tests serve it.
type imageKind struct {
	name, format string
	qemu         string // qemu-img's name for the format, "" for ram
	parent       string // format of the parent image, "" none
}

// crashKinds is every writable format, overlays on both kinds of parent
// included.
var crashKinds = []imageKind{
	{"raw", "raw", "raw", ""},
	{"qcow", "qcow", "qcow", ""},
	{"qcow2", "qcow2", "qcow2", ""},
	{"qcow2-overlay", "qcow2", "qcow2", "raw"},
	{"vhd-dynamic", "vhd", "vpc", ""},
	{"vhd-differencing", "vhd", "vpc", "vhd"},
	{"vmdk", "vmdk", "vmdk", ""},
	{"ram", "ram", "", ""},
}

// makeImage creates the crashSize image of disk name, of kind k, in dir
// (its parent too) and returns the YAML's image value and the file, ""
// for a ram disk, which is ramName in /dev/shm, removed when the test ends.
func makeImage(t *testing.T, bin, dir, name, ramName string, k imageKind) (image, file string) {
	t.Helper()
	if k.format == "ram" {
		t.Cleanup(func() { os.Remove("/dev/shm/blktap-ram-" + ramName) })
		return fmt.Sprintf("%s?size=%d", ramName, crashSize), ""
	}
	file = filepath.Join(dir, name+"."+k.format)
	args := []string{"image", "create", "-f", k.format}
	if k.parent != "" {
		parent := filepath.Join(dir, name+"-base."+k.parent)
		runTool(t, bin, "image", "create", "-f", k.parent, parent, fmt.Sprint(crashSize))
		args = append(args, "-b", filepath.Base(parent), "-F", k.parent)
	}
	runTool(t, bin, append(args, file, fmt.Sprint(crashSize))...)
	return file, file
}

const (
	crashSize  = 8 << 20
	crashBlock = 4096
)

// crashDisk is one disk of the matrix with its journaling writer.
type crashDisk struct {
	name, kind, format, qemu string
	image                    string // "" for ram
	guest                    bool
	uri                      string
	seed                     uint32
	img                      *nbd.Image
	j                        *journal
	cells                    map[string]cell
	leaks                    int           // clusters image check found leaked at the end
	pace                     time.Duration // pause between writes; 0 writes flat out

	quit chan struct{}
	done chan struct{}
}

// cell is the tally of one disk under one kind of kill.
type cell struct{ kills, writes, verified, losses, bad int }

func (c cell) add(o cell) cell {
	return cell{c.kills + o.kills, c.writes + o.writes, c.verified + o.verified, c.losses + o.losses, c.bad + o.bad}
}

// journal is what the writer knows of each block: the last generation it
// sent, the last one acknowledged, and the one the last acknowledged
// flush covered. After a kill a block must read back a generation at
// least the acknowledged one and at most the one sent.
type journal struct {
	mu                      sync.Mutex
	sent, acked, durable    []uint32
	writes, flushes, errors int
	lastErr                 error
}

func newJournal(blocks int) *journal {
	return &journal{sent: make([]uint32, blocks), acked: make([]uint32, blocks), durable: make([]uint32, blocks)}
}

func (j *journal) progress() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.writes
}

// crashPattern is block b's content at generation gen: a record naming
// the disk, the block and the generation, repeated, so a torn block, a
// block from another place and an old generation all show.
func crashPattern(seed uint32, b int, gen uint32) []byte {
	p := make([]byte, crashBlock)
	for off := 0; off < crashBlock; off += 16 {
		binary.LittleEndian.PutUint32(p[off:], 0x42544352)
		binary.LittleEndian.PutUint32(p[off+4:], seed)
		binary.LittleEndian.PutUint32(p[off+8:], uint32(b))
		binary.LittleEndian.PutUint32(p[off+12:], gen)
	}
	return p
}

// decodeBlock returns the generation p holds (0 for zeros) or an error
// when p is not wholly one generation of this block.
func decodeBlock(p []byte, seed uint32, b int) (uint32, error) {
	if bytes.Count(p, []byte{0}) == len(p) {
		return 0, nil
	}
	gen := binary.LittleEndian.Uint32(p[12:])
	if !bytes.Equal(p, crashPattern(seed, b, gen)) {
		return 0, errors.New("torn or foreign content")
	}
	return gen, nil
}

func (cd *crashDisk) start() {
	if cd.cells == nil {
		cd.cells = map[string]cell{}
	}
	cd.quit, cd.done = make(chan struct{}), make(chan struct{})
	go cd.write(rand.New(rand.NewPCG(uint64(cd.seed), uint64(cd.j.progress()))))
}

func (cd *crashDisk) stop() {
	close(cd.quit)
	<-cd.done
}

// write runs one request at a time until stopped, so a block's
// generations reach the disk in order. The client reconnects by itself
// across a kill and sends again what was unanswered; an error is a
// request not acknowledged, and the journal counts it.
func (cd *crashDisk) write(rng *rand.Rand) {
	defer close(cd.done)
	j := cd.j
	blocks := len(j.sent)
	for {
		select {
		case <-cd.quit:
			return
		case <-time.After(cd.pace):
		}
		b := rng.IntN(blocks)
		j.mu.Lock()
		j.sent[b]++
		gen := j.sent[b]
		j.mu.Unlock()
		_, err := cd.img.WriteAt(crashPattern(cd.seed, b, gen), int64(b)*crashBlock)
		j.mu.Lock()
		if err == nil {
			j.acked[b] = gen
			j.writes++
		} else {
			j.errors++
			j.lastErr = err
		}
		j.mu.Unlock()
		if rng.IntN(8) != 0 {
			continue
		}
		// Nothing else writes meanwhile: the flush covers exactly what
		// is acknowledged now.
		j.mu.Lock()
		covered := append([]uint32(nil), j.acked...)
		j.mu.Unlock()
		err = cd.img.Flush()
		j.mu.Lock()
		if err == nil {
			j.durable = covered
			j.flushes++
		} else {
			j.errors++
			j.lastErr = err
		}
		j.mu.Unlock()
	}
}

// verify reads every block back with the writer stopped.
func (cd *crashDisk) verify(t *testing.T) cell {
	t.Helper()
	j := cd.j
	j.mu.Lock()
	defer j.mu.Unlock()
	got := make([]byte, crashSize)
	if _, err := cd.img.ReadAt(got, 0); err != nil {
		t.Fatalf("%s: read back: %v", cd.name, err)
	}
	c := cell{kills: 1, writes: j.writes}
	j.writes = 0
	for b := range j.sent {
		if j.sent[b] == 0 {
			continue
		}
		gen, err := decodeBlock(got[b*crashBlock:(b+1)*crashBlock], cd.seed, b)
		switch {
		case err != nil || gen > j.sent[b]:
			c.bad++
			t.Errorf("%s: block %d: %v (generation %d; sent up to %d)", cd.name, b, err, gen, j.sent[b])
		case gen < j.durable[b]:
			c.losses++
			t.Errorf("%s: block %d holds generation %d; a flush covered %d", cd.name, b, gen, j.durable[b])
		case gen < j.acked[b]:
			c.losses++
			t.Errorf("%s: block %d holds generation %d; %d was acknowledged (unflushed)", cd.name, b, gen, j.acked[b])
		}
		if j.durable[b] != 0 {
			c.verified++
		}
	}
	if j.errors != 0 {
		t.Logf("%s: %d requests failed across the kill (last: %v)", cd.name, j.errors, j.lastErr)
		j.errors = 0
	}
	return c
}

// waitProgress waits until every writer has had n more writes
// acknowledged.
func waitProgress(t *testing.T, disks []*crashDisk, n int) {
	t.Helper()
	want := make([]int, len(disks))
	for i, cd := range disks {
		want[i] = cd.j.progress() + n
	}
	deadline := time.Now().Add(90 * time.Second)
	for i, cd := range disks {
		for cd.j.progress() < want[i] {
			if time.Now().After(deadline) {
				cd.j.mu.Lock()
				err := cd.j.lastErr
				cd.j.mu.Unlock()
				t.Fatalf("%s: the writer is stuck (last error: %v)", cd.name, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// waitBack polls `blktap ls` (which fails until a restarted daemon
// answers) until every disk is connected again, each killed worker
// replaced by a new one.
func waitBack(t *testing.T, d *daemon, names []string, killed map[string]int) map[string]lsRow {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		out, err := d.blktap("ls", "--json")
		last = out
		if err != nil {
			last = err.Error()
		}
		var rows []lsRow
		if err == nil && json.Unmarshal([]byte(out), &rows) == nil {
			back := map[string]lsRow{}
			for _, r := range rows {
				if r.Phase == "connected" && r.State == 4 && r.Export != "" && r.WorkerPid != 0 && r.WorkerPid != killed[r.Name] {
					back[r.Name] = r
				}
			}
			if len(back) == len(names) {
				return back
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("disks not back after the kill; last ls:\n%s", last)
	return nil
}

var leakedRE = regexp.MustCompile(`(\d+) leaked clusters were found`)

// checkLeaks runs a checker (ours or qemu-img's, same exit statuses) and
// returns how many leaked clusters it found; corruption fails the test.
// qemu-img's 63 is "this format has no check" (vpc).
func checkLeaks(t *testing.T, disk, prog string, args ...string) int {
	t.Helper()
	cmd := exec.Command(prog, args...)
	out, err := cmd.CombinedOutput()
	switch code := cmd.ProcessState.ExitCode(); {
	case err == nil || code == 63 && strings.Contains(prog, "qemu"):
		return 0
	case code == 3:
		n := 0
		if m := leakedRE.FindSubmatch(out); m != nil {
			n, _ = strconv.Atoi(string(m[1]))
		}
		return n
	default:
		t.Errorf("%s: %s %s: %v\n%s", disk, filepath.Base(prog), strings.Join(args, " "), err, out)
		return 0
	}
}
