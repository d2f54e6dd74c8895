package main

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats/nbd"
	"github.com/blktap-go/blktap/internal/oracle"
)

// The soak (issue 16 item 8, docs/SOAK.md): one daemon on the embedded
// default serving SOAK_DISKS disks of every writable format on both paths
// for SOAK_DURATION, fio with verify on half of them and the crash
// matrix's journaling writer on the other half, a worker SIGKILLed every
// SOAK_KILL_EVERY by a killer that finds workers in /proc (not through
// the control API under test), and extra disks added to and removed from
// the desired-state file. Every 10 s the daemon's and the workers' memory,
// descriptors, sockets and number are sampled to a CSV. It fails on any
// data error, image corruption, leaked worker, descriptor or socket, or
// memory that grows. `make soak` runs it; without SOAK_DURATION it skips.
func TestSoak(t *testing.T) {
	s := newSoak(t)
	qemuImg := oracle.Require(t, "qemu-img")
	fio := oracle.Require(t, "fio")
	s.bin = buildBinary(t)
	s.makeDisks()
	s.writeConfig(false)
	s.d = startDaemon(t, s.bin, s.cfgPath)
	s.d.waitConnectedWithin(5*time.Minute, s.names(s.base)...)
	// Nothing connected to any export yet: what every disk costs at rest.
	baseline := s.sample()
	t.Logf("soak: %d disks connected, %d workers; baseline %+v", len(s.base), baseline.workers, baseline)
	s.startLoads(fio)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, f := range []func(<-chan struct{}){s.killWorkers, s.churn, s.sampleEvery} {
		wg.Add(1)
		go func() { defer wg.Done(); f(stop) }()
	}
	time.Sleep(s.duration)
	close(stop)
	wg.Wait()

	s.settle()
	s.stopLoads()
	// The curves are the periodic samples; the end, with every client
	// gone, is compared with the baseline.
	end := s.sample()
	s.writeCSV(baseline, end)
	s.shutdownAndCheck(qemuImg)
	s.judge(baseline, end)
}

// soak is one run's disks, processes and tallies.
type soak struct {
	t                       *testing.T
	bin, dir, cfgPath, out  string
	duration, killEvery     time.Duration
	churnEvery              time.Duration
	memGrowth               float64 // largest growth of memory allowed, first third to last
	base, extras            []soakDisk
	d                       *daemon
	fios                    []*fioLoop
	mu                      sync.Mutex // guards what the goroutines below update
	declared, kills, churns int
	samples                 []soakSample
	journal                 cell // the journaled disks' tally at the end
	checked, leaks          int  // images checked at the end, clusters leaked
}

// soakDisk is one disk of the file: in it all along (base), or now and
// then (extras).
type soakDisk struct {
	name, image, file string
	kind              imageKind
	domain, device    int
	fio               bool       // fio with verify; else the journaling writer
	writer            *crashDisk // the journaling writer, nil for fio
}

// soakSample is one row of the CSV.
type soakSample struct {
	at                  time.Duration
	daemon, workerUsage procUsage
	unixPaths, workers  int
	declared, kills     int
}

func newSoak(t *testing.T) *soak {
	dur := os.Getenv("SOAK_DURATION")
	if dur == "" {
		t.Skip("the soak runs under `make soak` (SOAK_DURATION unset)")
	}
	s := &soak{t: t, dir: t.TempDir(), memGrowth: 0.25}
	s.duration = envDuration(t, "SOAK_DURATION", dur)
	s.killEvery = envDuration(t, "SOAK_KILL_EVERY", "10s")
	s.churnEvery = envDuration(t, "SOAK_CHURN_EVERY", "20s")
	s.cfgPath = filepath.Join(s.dir, "disks.yaml")
	s.out = os.Getenv("SOAK_OUT")
	if s.out == "" {
		s.out = t.TempDir()
	}
	if err := os.MkdirAll(s.out, 0o755); err != nil {
		t.Fatal(err)
	}
	return s
}

func envDuration(t *testing.T, name, def string) time.Duration {
	v := os.Getenv(name)
	if v == "" {
		v = def
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		t.Fatalf("%s=%q: want a positive duration like 90s or 10m", name, v)
	}
	return d
}

// makeDisks creates SOAK_DISKS images cycling through every writable
// format, the first eight for domain 0 (the worker's export), the next
// eight for domain 1 (the guest view), and so on; each format gets fio on
// one path and the journaling writer on the other. Then four extras for
// the churn, which carry no load.
func (s *soak) makeDisks() {
	n := 64
	if v := os.Getenv("SOAK_DISKS"); v != "" {
		if _, err := fmt.Sscan(v, &n); err != nil || n < 1 {
			s.t.Fatalf("SOAK_DISKS=%q: want a positive number", v)
		}
	}
	add := func(name string, k imageKind, domain int, fio bool) soakDisk {
		device := len(s.base) + len(s.extras) + 1
		ram := fmt.Sprintf("soak-%d-%d", os.Getpid(), device)
		image, file := makeImage(s.t, s.bin, s.dir, name, ram, k)
		return soakDisk{name: name, image: image, file: file, kind: k, domain: domain, device: device, fio: fio}
	}
	for i := range n {
		k := crashKinds[i%len(crashKinds)]
		domain := (i / len(crashKinds)) % 2
		fio := (i%len(crashKinds)+i/len(crashKinds))%2 == 1
		s.base = append(s.base, add(fmt.Sprintf("%s-%d-dom%d", k.name, i, domain), k, domain, fio))
	}
	for i, k := range []imageKind{crashKinds[0], crashKinds[2], crashKinds[4], crashKinds[6]} {
		s.extras = append(s.extras, add(fmt.Sprintf("extra-%s-dom%d", k.name, i%2), k, i%2, false))
	}
}

func (s *soak) names(disks []soakDisk) []string {
	var names []string
	for _, d := range disks {
		names = append(names, d.name)
	}
	return names
}

// writeConfig rewrites the desired-state file as the daemon's operator
// would (a new file renamed over the old), with the base disks and, when
// withExtras, every other extra, which ones depending on the churn step.
func (s *soak) writeConfig(withExtras bool) {
	var y strings.Builder
	y.WriteString("disks:\n")
	declared := 0
	put := func(d soakDisk) {
		fmt.Fprintf(&y, "  - {name: %s, image: %q, format: %s, domain: %d, device: d%d}\n", d.name, d.image, d.kind.format, d.domain, d.device)
		declared++
	}
	for _, d := range s.base {
		put(d)
	}
	s.mu.Lock()
	step := s.churns
	s.mu.Unlock()
	for i, d := range s.extras {
		if withExtras && (step+i)%2 == 0 {
			put(d)
		}
	}
	tmp := s.cfgPath + ".new"
	if err := os.WriteFile(tmp, []byte(y.String()), 0o644); err != nil {
		s.t.Error(err)
		return
	}
	if err := os.Rename(tmp, s.cfgPath); err != nil {
		s.t.Error(err)
		return
	}
	s.mu.Lock()
	s.declared = declared
	s.mu.Unlock()
}

// startLoads starts a journaling writer or an fio loop on every base disk.
func (s *soak) startLoads(fio string) {
	rows := s.d.waitConnectedWithin(time.Minute, s.names(s.base)...)
	for i := range s.base {
		sd := &s.base[i]
		uri := rows[sd.name].Export
		if sd.fio {
			f := &fioLoop{name: sd.name, uri: uri, quit: make(chan struct{}), done: make(chan struct{})}
			s.fios = append(s.fios, f)
			go f.run(fio)
			continue
		}
		// Long enough for a worker's restart; the writer is paced so 32
		// of them share two cores with everything else.
		img, err := nbd.Open(uri, nbd.Options{Timeout: 90 * time.Second})
		if err != nil {
			s.t.Fatalf("%s: %v", sd.name, err)
		}
		s.t.Cleanup(func() { go img.Close() })
		cd := &crashDisk{name: sd.name, format: sd.kind.format, uri: uri, seed: uint32(i + 1), img: img,
			j: newJournal(crashSize / crashBlock), pace: 5 * time.Millisecond}
		sd.writer = cd
		cd.start()
	}
}

// every calls f every d until stop is closed.
func every(stop <-chan struct{}, d time.Duration, f func()) {
	tick := time.NewTicker(d)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		f()
	}
}

// killWorkers SIGKILLs one worker of the daemon's, chosen at random among
// its child processes in /proc, every killEvery.
func (s *soak) killWorkers(stop <-chan struct{}) {
	rng := rand.New(rand.NewPCG(16, 8))
	every(stop, s.killEvery, func() {
		kids := childrenOf(s.d.cmd.Process.Pid)
		if len(kids) == 0 {
			return
		}
		if syscall.Kill(kids[rng.IntN(len(kids))], syscall.SIGKILL) == nil {
			s.mu.Lock()
			s.kills++
			s.mu.Unlock()
		}
	})
}

// churn rewrites the file every churnEvery: two steps of three swap which
// extras it declares, the third rewrites it unchanged (a rewrite that
// must change nothing).
func (s *soak) churn(stop <-chan struct{}) {
	n := 0
	every(stop, s.churnEvery, func() {
		if n++; n%3 != 0 {
			s.mu.Lock()
			s.churns++
			s.mu.Unlock()
		}
		s.writeConfig(true)
	})
}

func (s *soak) sampleEvery(stop <-chan struct{}) {
	began := time.Now()
	every(stop, 10*time.Second, func() {
		smp := s.sample()
		smp.at = time.Since(began)
		s.mu.Lock()
		s.samples = append(s.samples, smp)
		s.mu.Unlock()
	})
}

func (s *soak) sample() soakSample {
	smp := soakSample{daemon: usageOf(s.d.cmd.Process.Pid), unixPaths: unixSocketsUnder(s.d.stateDir)}
	for _, pid := range childrenOf(s.d.cmd.Process.Pid) {
		smp.workerUsage = smp.workerUsage.add(usageOf(pid))
		smp.workers++
	}
	s.mu.Lock()
	smp.declared, smp.kills = s.declared, s.kills
	s.mu.Unlock()
	return smp
}

// settle declares the base disks only and waits until every one is
// connected, the extras are gone and there is one worker per disk.
func (s *soak) settle() {
	s.writeConfig(false)
	deadline := time.Now().Add(3 * time.Minute)
	for {
		rows := s.lsRows()
		connected := 0
		for _, r := range rows {
			if r.Phase == "connected" && r.State == 4 {
				connected++
			}
		}
		workers := len(childrenOf(s.d.cmd.Process.Pid))
		if len(rows) == len(s.base) && connected == len(s.base) && workers == len(s.base) {
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("soak: not settled 3 minutes after the end: %d rows, %d connected, %d workers for %d disks",
				len(rows), connected, workers, len(s.base))
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func (s *soak) lsRows() []lsRow {
	out, err := s.d.blktap("ls", "--json")
	var rows []lsRow
	if err == nil && json.Unmarshal([]byte(out), &rows) == nil {
		return rows
	}
	return nil
}
