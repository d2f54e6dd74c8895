package formats

import (
	"bufio"
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats/ram"
	"github.com/blktap-go/blktap/internal/crashtest"
	"github.com/blktap-go/blktap/internal/oracle"
)

// killCase is one writable image kind the restart rule covers.
type killCase struct {
	name, format string
	subformat    string
	backing      string // format of a raw parent to create ("" none)
}

var killCases = []killCase{
	{name: "raw", format: "raw"},
	{name: "qcow", format: "qcow"},
	{name: "qcow-overlay", format: "qcow", backing: "raw"},
	{name: "qcow2", format: "qcow2"},
	{name: "qcow2-overlay", format: "qcow2", backing: "raw"},
	{name: "vhd-dynamic", format: "vhd"},
	{name: "vhd-differencing", format: "vhd", backing: "vhd"},
	{name: "vmdk", format: "vmdk"},
	{name: "vmdk-child", format: "vmdk", backing: "vmdk"},
	{name: "ram", format: "ram"},
}

const (
	killSize    = 16 << 20
	killWriters = 4
)

// TestKillLosesNothingAcknowledged is the restart rule at the format
// level, with a real process death: a child process writes and discards
// from several goroutines, printing each operation only after the image
// acknowledged it, and is killed with SIGKILL at a random moment. What
// the dead process left (its writes to the page cache) must then read
// back as every acknowledged operation, in a valid image.
func TestKillLosesNothingAcknowledged(t *testing.T) {
	if os.Getenv("BLKTAP_KILL_WRITER") != "" {
		t.Skip("the writer side runs in TestKillWriterProcess")
	}
	rounds := crashtest.Rounds(3)
	if testing.Short() {
		rounds = 1
	}
	for _, kc := range killCases {
		t.Run(kc.name, func(t *testing.T) {
			for round := range rounds {
				killRound(t, kc, uint64(round+1))
			}
		})
	}
}

// parentPattern is what a created parent holds, so a lost write that
// falls through to the parent shows.
func parentPattern(off int64) byte { return byte(off>>12) | 0x80 }

func killRound(t *testing.T, kc killCase, seed uint64) {
	path, model, backing := killImage(t, kc, seed)
	acks, inFlight := killWriter(t, kc, path, seed, model)
	killVerify(t, kc, path, backing, model, inFlight, acks)
	t.Logf("round %d: killed after %d acknowledged operations; all verified", seed, acks)
	killCheck(t, kc, path, backing)
}

// killImage creates the image a round writes (and its parent, filled with
// parentPattern); model starts as what the new image reads.
func killImage(t *testing.T, kc killCase, seed uint64) (path string, model []byte, backing OpenFunc) {
	dir := t.TempDir()
	path = filepath.Join(dir, "d."+kc.format)
	model = make([]byte, killSize)
	if kc.format == "ram" {
		path = fmt.Sprintf("blktaptest-kill-%d-%d?size=%d", os.Getpid(), seed, killSize)
	}
	if kc.backing != "" {
		parent := filepath.Join(dir, "base."+kc.backing)
		if err := Create(kc.backing, parent, CreateOptions{Size: killSize}); err != nil {
			t.Fatal(err)
		}
		img, err := Open(kc.backing, parent, Options{})
		if err != nil {
			t.Fatal(err)
		}
		for i := range model {
			model[i] = parentPattern(int64(i))
		}
		if _, err := img.WriteAt(model, 0); err != nil {
			t.Fatal(err)
		}
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
		backing = func(name, format string) (Image, error) {
			if format == "" {
				format = kc.backing
			}
			return Open(format, filepath.Join(dir, filepath.Base(name)), Options{ReadOnly: true})
		}
		if err := Create(kc.format, path, CreateOptions{Size: killSize, Backing: "base." + kc.backing, BackingFormat: kc.backing, OpenBacking: backing}); err != nil {
			t.Fatal(err)
		}
	} else if kc.format != "ram" {
		if err := Create(kc.format, path, CreateOptions{Size: killSize, Subformat: kc.subformat}); err != nil {
			t.Fatal(err)
		}
	}
	if kc.format == "ram" {
		t.Cleanup(func() { removeRAM(t, path) })
	}
	return path, model, backing
}

// killWriter runs the writer process, applies each operation it
// acknowledges to model, and kills it with SIGKILL after a random number
// of them. inFlight holds the ranges begun and not acknowledged.
func killWriter(t *testing.T, kc killCase, path string, seed uint64, model []byte) (acks int, inFlight [killWriters][2]int64) {
	cmd := exec.Command(os.Args[0], "-test.run=^TestKillWriterProcess$")
	cmd.Env = append(os.Environ(), "BLKTAP_KILL_WRITER="+strings.Join([]string{kc.format, path, kc.backing, strconv.FormatUint(seed, 10)}, "\n"))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(seed, 7))
	want := 20 + r.IntN(400)
	// A writer that stops acknowledging (stuck or failed) is killed too,
	// and the test fails below.
	stuck := time.AfterFunc(time.Minute, func() { cmd.Process.Kill() })
	defer stuck.Stop()
	sc := bufio.NewScanner(out)
	killed := false
	var other []string
	// An operation begun and not acknowledged when the writer died may
	// have happened in part or not at all: its bytes are not checked.
	for sc.Scan() {
		var what, op string
		var w int
		var off, n int64
		var v int
		if _, err := fmt.Sscanf(sc.Text(), "%s %d %s %d %d %d", &what, &w, &op, &off, &n, &v); err != nil || w < 0 || w >= killWriters {
			other = append(other, sc.Text())
			continue
		}
		if what == "begin" {
			inFlight[w] = [2]int64{off, off + n}
			continue
		}
		inFlight[w] = [2]int64{}
		switch op {
		case "write":
			for i := off; i < off+n; i++ {
				model[i] = byte(v)
			}
		case "discard":
			clear(model[off : off+n])
		}
		if acks++; acks == want && !killed {
			// Lines already in the pipe still count: the kill lands while
			// later writes are in flight.
			cmd.Process.Kill()
			killed = true
		}
	}
	if !killed {
		cmd.Process.Kill()
	}
	cmd.Wait()
	if acks < want {
		t.Fatalf("the writer acknowledged only %d operations before it stopped:\n%s", acks, strings.Join(other, "\n"))
	}
	return acks, inFlight
}

// killVerify reopens what the dead writer left and compares it with model,
// apart from the ranges in flight; then flushes (as the restarted worker
// answers the flush in flight) and closes.
func killVerify(t *testing.T, kc killCase, path string, backing OpenFunc, model []byte, inFlight [killWriters][2]int64, acks int) {
	img, err := Open(kc.format, path, Options{Backing: backing})
	if err != nil {
		t.Fatalf("reopen after the kill: %v", err)
	}
	defer img.Close()
	got := make([]byte, killSize)
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	for _, r := range inFlight {
		copy(got[r[0]:r[1]], model[r[0]:r[1]])
	}
	if i := firstDiffAt(got, model); i >= 0 {
		t.Fatalf("%d operations acknowledged before the kill; byte %d reads %#x, acknowledged %#x", acks, i, got[i], model[i])
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
}

// killCheck: the image must check clean apart from leaked space, by our
// checker and by qemu-img.
func killCheck(t *testing.T, kc killCase, path string, backing OpenFunc) {
	if kc.format == "ram" {
		return
	}
	res, err := Check(kc.format, path, RepairNone, backing)
	if err != nil || res.Corruptions != 0 {
		t.Fatalf("check after the kill: %+v, %v", res, err)
	}
	// The independent check: required under CI, where a missing oracle
	// must fail the run; elsewhere it runs when qemu-img is there.
	if _, err := exec.LookPath("qemu-img"); (err == nil || oracle.InCI()) && kc.format != "raw" {
		q := oracle.Require(t, "qemu-img")
		qf := map[string]string{"vhd": "vpc"}[kc.format]
		if qf == "" {
			qf = kc.format
		}
		c := exec.Command(q, "check", "-f", qf, path)
		b, err := c.CombinedOutput()
		// 3: leaked clusters only, which a kill may leave; 63: qemu
		// cannot check the format (qcow, vpc).
		if code := c.ProcessState.ExitCode(); err != nil && code != 3 && code != 63 {
			t.Fatalf("qemu-img check after the kill: %v\n%s", err, b)
		}
	}
}

func removeRAM(t *testing.T, params string) {
	name, _, err := ram.ParseParams(params)
	if err == nil {
		err = ram.Remove(name, ram.Options{})
	}
	if err != nil {
		t.Error(err)
	}
}

func firstDiffAt(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// TestKillWriterProcess is the child side of TestKillLosesNothingAcknowledged.
func TestKillWriterProcess(t *testing.T) {
	env := os.Getenv("BLKTAP_KILL_WRITER")
	if env == "" {
		t.Skip("runs only as the child of TestKillLosesNothingAcknowledged")
	}
	args := strings.Split(env, "\n")
	format, path, parent := args[0], args[1], args[2]
	seed, _ := strconv.ParseUint(args[3], 10, 64)
	var backing OpenFunc
	if parent != "" {
		dir := filepath.Dir(path)
		backing = func(name, format string) (Image, error) {
			if format == "" {
				format = parent
			}
			return Open(format, filepath.Join(dir, filepath.Base(name)), Options{ReadOnly: true})
		}
	}
	img, err := Open(format, path, Options{Backing: backing})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	say := func(what string, w int, op string, off, n int64, v int) {
		mu.Lock()
		defer mu.Unlock()
		// One write(2) per line: a pipe keeps it whole.
		os.Stdout.WriteString(fmt.Sprintf("%s %d %s %d %d %d\n", what, w, op, off, n, v))
	}
	fail := func(err error) {
		fmt.Fprintln(os.Stderr, "kill writer:", err)
		os.Exit(1)
	}
	for w := range killWriters {
		go func() {
			r := rand.New(rand.NewPCG(seed, uint64(w)))
			lo, span := int64(w)*killSize/killWriters, int64(killSize/killWriters)
			for i := 0; ; i++ {
				off := lo + r.Int64N(span)
				n := min(r.Int64N(128<<10)+1, lo+span-off)
				if r.IntN(10) == 0 {
					say("begin", w, "discard", off, n, 0)
					if err := img.Discard(off, n); err != nil {
						fail(err)
					}
					say("ack", w, "discard", off, n, 0)
					continue
				}
				v := w<<6 | i%63 + 1
				say("begin", w, "write", off, n, v)
				if _, err := img.WriteAt(bytes.Repeat([]byte{byte(v)}, int(n)), off); err != nil {
					fail(err)
				}
				say("ack", w, "write", off, n, v)
			}
		}()
	}
	select {} // the parent kills us
}
