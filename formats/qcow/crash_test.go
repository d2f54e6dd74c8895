package qcow

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/crashfs"
	"github.com/blktap-go/blktap/formats/internal/imagetest"
	"github.com/blktap-go/blktap/internal/crashtest"
	"github.com/blktap-go/blktap/internal/oracle"
)

// crashOp is a write or discard since the last completed flush: after
// the crash its range may hold its data or what was there before.
type crashOp struct {
	off  int64
	data []byte // zeros for a discard
}

// TestCrashConsistency runs random writes, discards and flushes on a file
// layer that crashes after a random number of writes and then keeps only
// the synced bytes plus a random subset of the unsynced writes. The
// reopened image must open, pass Check, hold every write acknowledged
// before the last completed flush, and read the same through qemu-img.
func TestCrashConsistency(t *testing.T) {
	qemuImg := ""
	if _, err := exec.LookPath("qemu-img"); err == nil || oracle.InCI() {
		qemuImg = oracle.Require(t, "qemu-img")
	}
	for seed := range crashtest.Seeds(40) {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) { crashOnce(t, qemuImg, seed) })
	}
}

// crashOnce is one seed of TestCrashConsistency.
func crashOnce(t *testing.T, qemuImg string, seed int) {
	const size = 384 << 10
	rng := rand.New(rand.NewPCG(uint64(seed), 0xC0FFEE))
	opts := CreateOptions{Size: size}
	model := make([]byte, size)
	var backing *memImage
	if seed%2 == 1 {
		opts.Backing = "base.raw"
		backing = &memImage{data: randBytes(rng, size-8192)} // shorter: zeros past its end
		copy(model, backing.data)
	}
	if seed%4 == 2 {
		opts.ClusterSize = 512
	}
	m := newMem(t, opts)
	var img *Image
	if backing != nil {
		img = openMem(t, m, backing)
	} else {
		img = openMem(t, m, nil)
	}
	// The power goes at a write: the one after the first
	// rng.IntN(80).
	m.FS().Schedule(rng.IntN(80)+1, crashfs.Writes)
	flushed, since := crashOps(rng, img, model)
	// Each write since the last sync kept when the coin says so.
	crashed := m.Crash(func() bool { return rng.IntN(2) != 0 })
	var bi *memImage
	if backing != nil {
		bi = backing
	}
	re, err := openStorage(newMemFile(crashed), "crashed", optsFor(bi))
	if err != nil {
		t.Fatalf("reopen after crash: %v", err)
	}
	res, err := check(newMemFile(crashed), CheckOptions{})
	if err != nil || !res.OK() {
		t.Fatalf("check after crash: %v %+v", err, res)
	}
	got := make([]byte, size)
	if _, err := re.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	crashVerify(t, got, flushed, since)
	if qemuImg != "" && seed < 6 {
		dir := t.TempDir()
		path := filepath.Join(dir, "crashed.qcow")
		os.WriteFile(path, crashed, 0o644)
		if backing != nil {
			os.WriteFile(filepath.Join(dir, "base.raw"), backing.data, 0o644)
		}
		if i := imagetest.FirstDiff(qemuRaw(t, qemuImg, path), got); i >= 0 {
			t.Fatalf("qemu reads the crashed image differently at %d", i)
		}
	}
}

// crashOps runs 60 random writes, discards and flushes on img (until one
// fails at the crash), keeping model; it returns what the image held at
// the last completed flush and the operations since.
func crashOps(rng *rand.Rand, img *Image, model []byte) (flushed []byte, since []crashOp) {
	size := int64(len(model))
	flushed = append([]byte(nil), model...)
	for range 60 {
		off := rng.Int64N(size)
		n := min(rng.Int64N(30000)+1, size-off)
		var err error
		switch r := rng.IntN(10); {
		case r < 6:
			p := randBytes(rng, int(n))
			since = append(since, crashOp{off, p})
			if _, err = img.WriteAt(p, off); err == nil {
				copy(model[off:], p)
			}
		case r < 8:
			since = append(since, crashOp{off, make([]byte, n)})
			if err = img.Discard(off, n); err == nil {
				clear(model[off : off+n])
			}
		default:
			if err = img.Flush(); err == nil {
				flushed = append(flushed[:0], model...)
				since = since[:0]
			}
		}
		if err != nil {
			break
		}
	}
	return flushed, since
}

// crashVerify: each byte got holds its flushed value or what one of the
// operations since wrote there.
func crashVerify(t *testing.T, got, flushed []byte, since []crashOp) {
	for i := range got {
		if got[i] == flushed[i] {
			continue
		}
		ok := false
		for _, op := range since {
			if int64(i) >= op.off && int64(i) < op.off+int64(len(op.data)) && op.data[int64(i)-op.off] == got[i] {
				ok = true
				break
			}
		}
		if !ok {
			t.Fatalf("byte %d = %#x: neither the flushed %#x nor any later write", i, got[i], flushed[i])
		}
	}
}

func optsFor(b *memImage) Options {
	var o Options
	if b != nil {
		o.Backing = func(string, string) (image.Image, error) { return b, nil }
	}
	return o
}
