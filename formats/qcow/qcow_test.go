package qcow

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/crashfs"
	"github.com/blktap-go/blktap/formats/internal/imagetest"
)

// TestModel drives random writes, discards and reads against a byte-slice
// model, over several layouts, standalone and over a backing image, and
// checks every read, the Map, a reopen, and Check.
func TestModel(t *testing.T) {
	layouts := []struct {
		name    string
		opts    CreateOptions
		backing int64 // backing size, 0 = none
	}{
		{"default-4k", CreateOptions{Size: 3<<20 + 1000}, 0},
		{"backed-512", CreateOptions{Size: 2 << 20, Backing: "base"}, 2 << 20},
		{"backed-short-backing", CreateOptions{Size: 2 << 20, Backing: "base"}, 1<<20 + 3000},
		{"64k-l2bits-6", CreateOptions{Size: 9 << 20, ClusterSize: 64 << 10, L2Bits: 6}, 0},
		{"backed-4k", CreateOptions{Size: 1 << 20, Backing: "base", ClusterSize: 4096}, 3 << 20},
	}
	for _, lay := range layouts {
		t.Run(lay.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(1, uint64(len(lay.name))))
			size := alignUp(lay.opts.Size, 512)
			model := make([]byte, size)
			var backing *memImage
			if lay.backing > 0 {
				backing = &memImage{data: randBytes(rng, int(lay.backing))}
				// Leave a zero stretch so the backing's Map has holes.
				clear(backing.data[lay.backing/2 : lay.backing/2+8192])
				copy(model, backing.data)
			}
			m := newMem(t, lay.opts)
			var bi image.Image
			if backing != nil {
				bi = backing
			}
			img := openMem(t, m, bi)
			for i := range 200 {
				off := rng.Int64N(size)
				n := min(rng.Int64N(100000)+1, size-off)
				switch rng.IntN(10) {
				case 0:
					if err := img.Discard(off, n); err != nil {
						t.Fatal(err)
					}
					clear(model[off : off+n])
				case 1, 2, 3, 4:
					p := randBytes(rng, int(n))
					if _, err := img.WriteAt(p, off); err != nil {
						t.Fatalf("op %d: %v", i, err)
					}
					copy(model[off:], p)
				default:
					got := make([]byte, n)
					if _, err := img.ReadAt(got, off); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, model[off:off+n]) {
						t.Fatalf("op %d: read [%d,+%d) differs from the model", i, off, n)
					}
				}
			}
			checkWhole(t, img, model)
			checkMap(t, img, model)
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			img = openMem(t, newMemFile(m.Bytes()), bi)
			checkWhole(t, img, model)
			res, err := check(newMemFile(m.Bytes()), CheckOptions{})
			if err != nil || !res.OK() {
				t.Fatalf("check: %v %+v", err, res)
			}
		})
	}
}

func checkWhole(t *testing.T, img *Image, model []byte) {
	t.Helper()
	got := make([]byte, len(model))
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if i := imagetest.FirstDiff(got, model); i >= 0 {
		t.Fatalf("image differs from the model at %d", i)
	}
}

// checkMap: the extents tile the range, holes read as zeros, and data at
// depth 0 is exactly the allocated clusters.
func checkMap(t *testing.T, img *Image, model []byte) {
	t.Helper()
	for _, e := range imagetest.MapAll(t, img) {
		if e.Kind == image.Hole && !image.IsZero(model[e.Offset:e.Offset+e.Length]) {
			t.Fatalf("hole %+v holds data", e)
		}
		if e.Kind == image.Data && e.Depth == 0 {
			kind, _, _, err := img.resolve(e.Offset>>img.h.clusterBits, 1)
			if err != nil || kind == runUnalloc {
				t.Fatalf("depth-0 data %+v is unallocated", e)
			}
		}
		if img.backing == nil && e.Depth != 0 {
			t.Fatalf("standalone image has depth %d", e.Depth)
		}
	}
}

func TestConcurrentWriters(t *testing.T) {
	// Many goroutines write disjoint stripes that share clusters and L2
	// tables, so allocations race; the result must match and no cluster
	// may be referenced twice.
	m := newMem(t, CreateOptions{Size: 4 << 20, Backing: "b"})
	backing := &memImage{data: bytes.Repeat([]byte{0xAB}, 4<<20)}
	img := openMem(t, m, backing)
	model := bytes.Repeat([]byte{0xAB}, 4<<20)
	const workers, stripe = 8, 100
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for i := range 200 {
				// Stripes interleave at 100 bytes: neighbours share a 512-byte cluster.
				off := int64((i*workers+w)*stripe) % (4<<20 - stripe)
				p := bytes.Repeat([]byte{byte(w + 1)}, stripe)
				if _, err := img.WriteAt(p, off); err != nil {
					t.Error(err)
					return
				}
				got := make([]byte, stripe)
				if _, err := img.ReadAt(got, int64(rng.IntN(4<<20-stripe))); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	for w := range workers {
		for i := range 200 {
			off := int64((i*workers+w)*stripe) % (4<<20 - stripe)
			copy(model[off:off+stripe], bytes.Repeat([]byte{byte(w + 1)}, stripe))
		}
	}
	checkWhole(t, img, model)
	res, err := check(m, CheckOptions{})
	if err != nil || !res.OK() || res.LeakedClusters != 0 {
		t.Fatalf("check: %v %+v", err, res)
	}
}

func TestErrors(t *testing.T) {
	m := newMem(t, CreateOptions{Size: 1 << 20})
	img := openMem(t, m, nil)
	if _, err := img.ReadAt(make([]byte, 10), 1<<20-5); !errors.Is(err, image.ErrOutOfRange) {
		t.Fatalf("read past end: %v", err)
	}
	if _, err := img.WriteAt(make([]byte, 10), -1); !errors.Is(err, image.ErrOutOfRange) {
		t.Fatalf("write before start: %v", err)
	}
	if err := img.Discard(0, 1<<21); !errors.Is(err, image.ErrOutOfRange) {
		t.Fatalf("discard past end: %v", err)
	}
	if _, err := img.Map(5, 1<<20); !errors.Is(err, image.ErrOutOfRange) {
		t.Fatalf("map past end: %v", err)
	}
	img.Close()
	if _, err := img.ReadAt(make([]byte, 1), 0); !errors.Is(err, image.ErrClosed) {
		t.Fatalf("read after close: %v", err)
	}
	if err := img.Close(); !errors.Is(err, image.ErrClosed) {
		t.Fatalf("second close: %v", err)
	}

	ro, err := openStorage(newMemFile(m.Bytes()), "mem", Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ro.WriteAt([]byte{1}, 0); !errors.Is(err, image.ErrReadOnly) {
		t.Fatalf("write read-only: %v", err)
	}
	if err := ro.Discard(0, 512); !errors.Is(err, image.ErrReadOnly) {
		t.Fatalf("discard read-only: %v", err)
	}

	// A backing file without an opener.
	mb := newMem(t, CreateOptions{Size: 1 << 20, Backing: "base.raw"})
	if _, err := openStorage(mb, "mem", Options{}); !errors.Is(err, ErrNoBackingOpener) {
		t.Fatalf("no opener: %v", err)
	}
	// The opener's error is wrapped.
	sentinel := errors.New("not allowed")
	_, err = openStorage(mb, "mem", Options{Backing: func(string, string) (image.Image, error) { return nil, sentinel }})
	if !errors.Is(err, sentinel) {
		t.Fatalf("opener error: %v", err)
	}
	// A failing write surfaces and the image stays readable.
	mw := newMem(t, CreateOptions{Size: 1 << 20})
	imgw := openMem(t, mw, nil)
	eio := errors.New("EIO")
	mw.FS().FailWrites(func(int) error { return eio })
	if _, err := imgw.WriteAt([]byte{1}, 0); err == nil {
		t.Fatal("write on a failing file succeeded")
	}
	mw.FS().FailWrites(nil)
	if _, err := imgw.WriteAt([]byte{1}, 0); err != nil {
		t.Fatal(err)
	}
}

func TestBlktapLittleEndianL1(t *testing.T) {
	// An old tapdisk image: blktap extension with flag 2 clear and the L1
	// in host (little-endian) order; the L2 and data are ordinary.
	img := buildBlktapImage(t, false)
	got := make([]byte, 8192)
	if _, err := img.ReadAt(got, 4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:4096], bytes.Repeat([]byte{0x5A}, 4096)) || !image.IsZero(got[4096:]) {
		t.Fatal("little-endian L1 not followed")
	}
	info := img.Info()
	if info.Xen == nil || info.Xen.L1BigEndian {
		t.Fatalf("info: %+v", info.Xen)
	}
	// Writing a new L2 table keeps the L1 little-endian.
	p := bytes.Repeat([]byte{0x77}, 100)
	if _, err := img.WriteAt(p, 3<<20); err != nil {
		t.Fatal(err)
	}
	m := img.st.(*crashfs.File)
	again := openMem(t, newMemFile(m.Bytes()), nil)
	got = make([]byte, 100)
	again.ReadAt(got, 3<<20)
	if !bytes.Equal(got, p) {
		t.Fatal("write to a little-endian L1 image lost")
	}
	if img := buildBlktapImage(t, true); img.Info().Xen == nil || !img.Info().Xen.L1BigEndian {
		t.Fatal("big-endian flag not seen")
	}
}

// buildBlktapImage lays out a 4 MiB image the way blktap's qcow-create did
// (extension header, L1 at 4096) with cluster 1 of the image allocated.
func buildBlktapImage(t *testing.T, bigEndianL1 bool) *Image {
	t.Helper()
	const size = 4 << 20
	h := &header{version: 1, size: size, clusterBits: 12, l2Bits: 9, l1Offset: 4096}
	buf := make([]byte, 4096+4096) // header page, L1 page
	copy(buf, encodeHeader(h))
	copy(buf[48:], xenMagic)
	flags := uint32(xenFlagSparse)
	order := h.l1Order()
	if bigEndianL1 {
		flags |= xenFlagL1BigEndian
	} else {
		h.l1LittleEndian = true
		order = h.l1Order()
	}
	putBE32(buf[56:], 512)
	putBE32(buf[60:], flags)
	l2off := uint64(len(buf))
	order.PutUint64(buf[4096:], l2off)
	l2 := make([]byte, 4096)
	dataOff := l2off + 4096
	putBE64(l2[8:], dataOff) // virtual cluster 1
	buf = append(buf, l2...)
	buf = append(buf, bytes.Repeat([]byte{0x5A}, 4096)...)
	return openMem(t, newMemFile(buf), nil)
}

func putBE32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v>>24), byte(v>>16), byte(v>>8), byte(v)
}
func putBE64(b []byte, v uint64) { putBE32(b, uint32(v>>32)); putBE32(b[4:], uint32(v)) }

func TestDiscardDeallocates(t *testing.T) {
	m := newMem(t, CreateOptions{Size: 1 << 20})
	img := openMem(t, m, nil)
	img.WriteAt(bytes.Repeat([]byte{1}, 64<<10), 0)
	if err := img.Discard(1000, 40000); err != nil {
		t.Fatal(err)
	}
	ext, _ := img.Map(0, 64<<10)
	want := []image.Extent{
		{Offset: 0, Length: 4096, Kind: image.Data},
		{Offset: 4096, Length: 36864, Kind: image.Hole},
		{Offset: 40960, Length: 65536 - 40960, Kind: image.Data},
	}
	if fmt.Sprint(ext) != fmt.Sprint(want) {
		t.Fatalf("map after discard:\n got %v\nwant %v", ext, want)
	}
	got := make([]byte, 64<<10)
	img.ReadAt(got, 0)
	for i, b := range got {
		if want := byte(1); i >= 1000 && i < 41000 {
			want = 0
			if b != want {
				t.Fatalf("byte %d = %d after discard", i, b)
			}
		} else if b != want {
			t.Fatalf("byte %d = %d, want 1", i, b)
		}
	}
	res, err := check(m, CheckOptions{})
	if err != nil || !res.OK() || res.LeakedClusters != 9 {
		t.Fatalf("check after discard: %v %+v", err, res)
	}
}

// TestConcurrentMixed: goroutines own interleaved 1 KiB slots (so they
// share clusters of 512 B neighbours' tables, and 4 KiB clusters with each
// other) and write, discard and flush at once; each slot must end as its
// owner left it, and Check must find no cluster used twice.
func TestConcurrentMixed(t *testing.T) {
	for _, cs := range []int64{512, 4096} {
		t.Run(fmt.Sprint(cs), func(t *testing.T) {
			const size, slot, workers = 2 << 20, 1024, 6
			m := newMem(t, CreateOptions{Size: size, ClusterSize: cs})
			img := openMem(t, m, nil)
			model := make([]byte, size)
			var wg sync.WaitGroup
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(w), uint64(cs)))
					nSlots := size / slot / workers
					for range 300 {
						s := int64(rng.IntN(nSlots)*workers+w) * slot
						switch rng.IntN(6) {
						case 0:
							if err := img.Discard(s, slot); err != nil {
								t.Error(err)
								return
							}
							clear(model[s : s+slot])
						case 1:
							if err := img.Flush(); err != nil {
								t.Error(err)
								return
							}
						default:
							p := randBytes(rng, slot)
							if _, err := img.WriteAt(p, s); err != nil {
								t.Error(err)
								return
							}
							copy(model[s:], p)
						}
					}
				}()
			}
			wg.Wait()
			checkWhole(t, img, model)
			res, err := check(m, CheckOptions{})
			if err != nil || !res.OK() {
				t.Fatalf("check: %v %+v", err, res)
			}
		})
	}
}
