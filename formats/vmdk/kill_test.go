package vmdk

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/blktap-go/blktap/formats/internal/crashfs"
	"github.com/blktap-go/blktap/formats/internal/imagetest"
)

// TestKillKeepsAcknowledged kills the process that wrote the image right
// after its last acknowledged write: the Image is dropped without Flush or
// Close, so only what reached the file (the page cache, which outlives
// the process) remains. A new process must read every acknowledged byte;
// after it performs the flush the dead one had in flight, a power cut
// must not lose any of them either.
func TestKillKeepsAcknowledged(t *testing.T) {
	for seed := uint64(1); seed <= 24; seed++ {
		variant := []string{"plain", "zeroed", "child", "notables"}[seed%4]
		t.Run(fmt.Sprintf("seed%d-%s", seed, variant), func(t *testing.T) {
			killOnce(t, seed, variant)
		})
	}
}

func killOnce(t *testing.T, seed uint64, variant string) {
	const p = "/img/d.vmdk"
	const size int64 = 4<<20 + 4096
	fs := crashfs.New()
	model, backing := newVariant(t, fs, p, size, variant)
	img, err := Open(p, Options{fs: fs, GTCache: 4, Backing: backing})
	if err != nil {
		t.Fatal(err)
	}
	killWriters(t, img, model, seed)
	// The kill: img is never used again.
	img = nil

	if backing != nil {
		backing = memOpener(fs)
	}
	res, err := Check(p, CheckOptions{fs: fs})
	if err != nil || res.Corruptions != 0 {
		t.Fatalf("after kill: %+v, %v", res, err)
	}
	after, err := Open(p, Options{fs: fs, Backing: backing})
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, after); !bytes.Equal(got, model) {
		t.Fatalf("after kill: acknowledged byte %d lost", imagetest.FirstDiff(got, model))
	}
	// The new process answers the flush the dead one had in flight.
	if err := after.Flush(); err != nil {
		t.Fatal(err)
	}
	// Nothing is pending after the flush: no coin is needed.
	fs2 := crashfs.FromImage(fs.Crash(func() bool { return true }))
	if backing != nil {
		backing = memOpener(fs2)
	}
	res, err = Check(p, CheckOptions{fs: fs2})
	if err != nil || res.Corruptions != 0 {
		t.Fatalf("after kill, flush and power cut: %+v, %v", res, err)
	}
	cut, err := Open(p, Options{ReadOnly: true, fs: fs2, Backing: backing})
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, cut); !bytes.Equal(got, model) {
		t.Fatalf("after kill, flush and power cut: flushed byte %d lost", imagetest.FirstDiff(got, model))
	}
}

// killWriters runs four goroutines of random writes and discards on img,
// keeping model. Each writer owns a quarter of the disk, so the model needs
// no lock while the writers race on shared grain tables and syncs.
func killWriters(t *testing.T, img *Image, model []byte, seed uint64) {
	const writers = 4
	size := int64(len(model))
	var wg sync.WaitGroup
	errs := make([]error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, uint64(w)))
			lo, span := int64(w)*size/writers, int64(size/writers)
			for i := 0; i < 60; i++ {
				off := lo + r.Int64N(span)
				n := min(r.Int64N(20000)+1, lo+span-off)
				if r.IntN(8) == 0 {
					if err := img.Discard(off, n); err != nil {
						errs[w] = err
						return
					}
					clear(model[off : off+n])
					continue
				}
				b := bytes.Repeat([]byte{byte(w<<6 | i + 1)}, int(n))
				if _, err := img.WriteAt(b, off); err != nil {
					errs[w] = err
					return
				}
				copy(model[off:], b)
			}
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
}
