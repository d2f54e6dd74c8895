package qcow2

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/formats/internal/crashfs"
	"github.com/blktap-go/blktap/internal/crashtest"
)

// sectorSet is a bitset of byte values a sector may hold after a crash.
type sectorSet [4]uint64

func (s *sectorSet) add(v byte)      { s[v/64] |= 1 << (v % 64) }
func (s *sectorSet) has(v byte) bool { return s[v/64]&(1<<(v%64)) != 0 }
func (s *sectorSet) reset(v byte)    { *s = sectorSet{}; s.add(v) }

// Crash consistency: a file that keeps only synced writes plus a random
// subset of the rest, cut after a random number of operations. The image
// must pass our check and qemu-img check (leaks allowed: no corruption)
// and hold every write acknowledged before the last completed flush;
// sectors written since may hold any value written since.
func TestCrashConsistency(t *testing.T) {
	dir := t.TempDir()
	const size = 1 << 20
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, bytes.Repeat([]byte{0xEE}, 768<<10), 0o644); err != nil {
		t.Fatal(err)
	}
	configs := []struct {
		name   string
		o      CreateOptions
		maxLen int // sectors per write
	}{
		{"v3", CreateOptions{Size: size, ClusterSize: 4096}, 24},
		{"v2-backing", CreateOptions{Size: size, ClusterSize: 4096, Compat: "0.10", Backing: "base.raw", BackingFormat: "raw"}, 24},
		{"v3-backing-cs512", CreateOptions{Size: size, ClusterSize: 512, Backing: "base.raw", BackingFormat: "raw"}, 24},
		{"lazy-backing", CreateOptions{Size: size, ClusterSize: 4096, LazyRefcounts: true, Backing: "base.raw", BackingFormat: "raw"}, 24},
		// 64-bit refcounts in 512 B clusters: a block counts 64 clusters
		// and the first table only 2 MiB of file, so it must grow.
		{"grow-reftable", CreateOptions{Size: 4 * size, ClusterSize: 512, RefcountBits: 64}, 400},
		// Every cluster shared with an internal snapshot: copy-on-write
		// of L2 tables and data, refcounts 2 -> 1.
		{"snapshot", CreateOptions{Size: size, ClusterSize: 4096}, 24},
		// Compressed clusters packed several to a host cluster, some
		// then overwritten: shared refcounts rise and fall.
		{"compressed", CreateOptions{Size: size, ClusterSize: 4096}, 24},
		{"compressed-zstd", CreateOptions{Size: size, ClusterSize: 4096, CompressionType: "zstd"}, 24},
	}
	// 8 seeds per configuration by default; CRASH_SEEDS per format.
	seeds := uint64(crashtest.PerConfig(8*len(configs), len(configs)))
	// Seeds that once failed with more seeds than the default run.
	found := map[string][]uint64{
		// An L2 entry kept, its data cluster past the end of the file:
		// the dirty open's repair must unmap it, not refuse the image.
		"lazy-backing": {102},
	}
	for _, c := range configs {
		run := func(seed uint64) {
			t.Run(fmt.Sprintf("%s/seed%d", c.name, seed), func(t *testing.T) {
				crashOnce(t, dir, c.o, c.name, seed, c.maxLen)
			})
		}
		for seed := uint64(1); seed <= seeds; seed++ {
			run(seed)
		}
		for _, seed := range found[c.name] {
			if seed > seeds {
				run(seed)
			}
		}
	}
}

func crashOnce(t *testing.T, dir string, o CreateOptions, name string, seed uint64, maxLen int) {
	rng := rand.New(rand.NewPCG(seed, 99))
	tmpl := crashTemplate(t, dir, o, name, seed)
	mf, img := openOnCrashFS(t, tmpl, readFile(t, tmpl))
	m := newCrashModel(o, name)
	ops := crashRandomOps(t, img, m, rng, name, maxLen)
	if name == "grow-reftable" && img.mu.refClus < 2 {
		t.Fatalf("refcount table did not grow (%d ops)", ops)
	}
	// Power cut: the image object is abandoned, the disk keeps what it keeps.
	p := filepath.Join(dir, fmt.Sprintf("%s-%d.qcow2", name, seed))
	// Each write since the last sync kept when the coin says so.
	if err := os.WriteFile(p, mf.Crash(func() bool { return rng.IntN(2) == 0 }), 0o644); err != nil {
		t.Fatal(err)
	}
	if o.LazyRefcounts {
		// A dirty image is repaired on a writable open.
		img, err := Open(p, Options{Backing: openerFor(p)})
		if err != nil {
			t.Fatal(err)
		}
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
		requireQemuClean(t, p)
	} else {
		crashChecks(t, p, mf, img)
	}
	if name == "snapshot" {
		snap := qemuRaw(t, p, "-l", "s1")
		if !bytes.Equal(snap, bytes.Repeat([]byte{250}, len(snap))) {
			t.Fatal("snapshot content changed")
		}
	}
	m.verify(t, qemuRaw(t, p))
}

// crashTemplate creates the image a run starts from; the "snapshot" one
// holds 250 everywhere and an internal snapshot s1 of that.
func crashTemplate(t *testing.T, dir string, o CreateOptions, name string, seed uint64) string {
	tmpl := filepath.Join(dir, fmt.Sprintf("%s-%d.tmpl", name, seed))
	if err := Create(tmpl, o); err != nil {
		t.Fatal(err)
	}
	if name == "snapshot" {
		img, err := Open(tmpl, Options{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := img.WriteAt(bytes.Repeat([]byte{250}, int(o.Size)), 0); err != nil {
			t.Fatal(err)
		}
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
		run(t, "qemu-img", "snapshot", "-c", "s1", tmpl)
	}
	return tmpl
}

// crashModel is, per sector, the last value written (cur) and the values
// it may hold after a crash (allowed: its value at the last completed
// flush and any written since).
type crashModel struct {
	cur     []byte
	allowed []sectorSet
}

func newCrashModel(o CreateOptions, name string) *crashModel {
	sectors := int(o.Size / 512)
	m := &crashModel{cur: make([]byte, sectors), allowed: make([]sectorSet, sectors)}
	for s := range m.cur {
		if o.Backing != "" && s < 768<<10/512 {
			m.cur[s] = 0xEE
		}
		if name == "snapshot" {
			m.cur[s] = 250
		}
		m.allowed[s].reset(m.cur[s])
	}
	return m
}

func (m *crashModel) set(s0, n int, v byte) {
	for s := s0; s < s0+n; s++ {
		m.cur[s] = v
		m.allowed[s].add(v)
	}
}

func (m *crashModel) flushed() {
	for s := range m.cur {
		m.allowed[s].reset(m.cur[s])
	}
}

func (m *crashModel) verify(t *testing.T, got []byte) {
	for s := range m.cur {
		sec := got[s*512 : s*512+512]
		v := sec[0]
		if !bytes.Equal(sec, bytes.Repeat([]byte{v}, 512)) || !m.allowed[s].has(v) {
			t.Fatalf("sector %d after crash holds %#x (torn or never written); last value %#x", s, v, m.cur[s])
		}
	}
}

// crashRandomOps runs the random operations (after the unflushed fill that
// makes "grow-reftable" grow its table) and returns how many.
func crashRandomOps(t *testing.T, img *Image, m *crashModel, rng *rand.Rand, name string, maxLen int) int {
	sectors := len(m.cur)
	ops := 20 + rng.IntN(60)
	id := byte(0)
	if name == "grow-reftable" {
		// Fill 2.25-3 MiB so the table must grow, unflushed.
		id = 201
		n := (4608 + rng.IntN(1536)) * 512
		for off := 0; off < n; off += 128 << 10 {
			l := min(128<<10, n-off)
			if _, err := img.WriteAt(bytes.Repeat([]byte{id}, l), int64(off)); err != nil {
				t.Fatal(err)
			}
			m.set(off/512, l/512, id)
		}
	}
	for i := 0; i < ops; i++ {
		s0 := rng.IntN(sectors)
		n := min(1+rng.IntN(maxLen), sectors-s0)
		switch r := rng.IntN(12); {
		case r == 0:
			if err := img.Discard(int64(s0)*512, int64(n)*512); err != nil {
				t.Fatal(err)
			}
			m.set(s0, n, 0)
		case r <= 2:
			if err := img.Flush(); err != nil {
				t.Fatal(err)
			}
			m.flushed()
		case r <= 6 && strings.HasPrefix(name, "compressed"):
			c0 := s0 / 8 * 8
			id = id%200 + 1
			if err := img.WriteCompressed(bytes.Repeat([]byte{id}, 4096), int64(c0)*512); err != nil {
				t.Fatal(err)
			}
			m.set(c0, 8, id)
		default:
			id = id%200 + 1
			if _, err := img.WriteAt(bytes.Repeat([]byte{id}, n*512), int64(s0)*512); err != nil {
				t.Fatal(err)
			}
			m.set(s0, n, id)
		}
	}
	return ops
}

// crashChecks: the crashed image p must pass our check and qemu-img's
// (leaks allowed), and check clean once its leaks are repaired.
func crashChecks(t *testing.T, p string, mf *crashfs.File, img *Image) {
	res, err := Check(p, CheckOptions{})
	if err != nil || res.Corruptions != 0 {
		if os.Getenv("QCOW2_DEBUG") != "" {
			pending, kept := mf.Pending()
			for i, w := range pending {
				t.Logf("pending %d off %d len %d trunc %v kept %v", i, w.Off, len(w.Data), w.Truncate, kept[i])
			}
			t.Logf("reftable at %d: %x", img.mu.refOff, img.mu.refTable[:80])
		}
		t.Fatalf("our check after crash: %v %+v", err, res)
	}
	if code, out := qemuCheck(t, p); code != 0 && code != 3 {
		t.Fatalf("qemu-img check after crash: exit %d\n%s", code, out)
	}
	if res, err := Check(p, CheckOptions{Repair: RepairLeaks}); err != nil || !res.Clean() {
		t.Fatalf("repair: %v %+v", err, res)
	}
	requireQemuClean(t, p)
}
