package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"
)

// fioLoop runs fio with verify on one disk again and again until told to
// stop. A worker kill cuts a domain-0 disk's NBD connection, which fio's
// engine does not survive: such a run ends in an I/O error and the next
// one starts over. Only a verify failure is a data error.
type fioLoop struct {
	name, uri string
	// verified: runs that wrote the whole disk and read it all back
	// right; cut: runs an I/O error (a kill) ended; bad: verify failures.
	verified, cut, bad int
	badOut             string
	quit, done         chan struct{}
}

// fio's words for data that read back wrong: "verify: bad magic header",
// "crc32c: verify failed", "Expected CRC".
var fioVerifyFailed = regexp.MustCompile(`verify: bad|verify failed|Expected CRC|bad header`)

func (f *fioLoop) run(fio string) {
	defer close(f.done)
	for {
		select {
		case <-f.quit:
			return
		default:
		}
		out, err, stopped := f.once(fio)
		switch {
		case stopped:
			return
		case fioVerifyFailed.Match(out):
			f.bad++
			f.badOut = string(out)
		case err == nil:
			f.verified++
		default:
			f.cut++
			time.Sleep(time.Second) // the worker is being restarted
		}
	}
}

// once runs fio once and returns its output, how it ended, and whether
// the soak stopped it.
func (f *fioLoop) once(fio string) (out []byte, err error, stopped bool) {
	// Rate-limited: 32 of these share two cores with the daemon.
	cmd := exec.Command(fio, "--name="+f.name, "--ioengine=nbd", "--uri="+f.uri,
		"--rw=randwrite", "--bs=4k", "--iodepth=4", fmt.Sprintf("--size=%d", crashSize), "--rate_iops=200",
		"--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0")
	// Its own group: fio forks a process per job, and a job stuck in the
	// loop below ignores the polite signals.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	w := &fioOutput{dead: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		return []byte(err.Error()), err, false
	}
	ended := make(chan error, 1)
	go func() { ended <- cmd.Wait() }()
	select {
	case err = <-ended:
	case <-w.dead:
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		err = <-ended
	case <-f.quit:
		// Stopped by the soak, not by a fault: not counted.
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-ended
		return nil, nil, true
	}
	return w.bytes(), err, false
}

// fioOutput keeps the first 64 KiB fio writes and tells when fio's nbd
// engine lost its connection: fio 3.x then repeats "nbd_poll: nothing to
// poll for in state DEAD" as fast as it can, forever, instead of failing
// the job.
type fioOutput struct {
	mu      sync.Mutex
	b       []byte
	dead    chan struct{} // closed at the first such line
	sawDead bool
}

func (o *fioOutput) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if n := min(len(p), 64<<10-len(o.b)); n > 0 {
		o.b = append(o.b, p[:n]...)
	}
	if !o.sawDead && bytes.Contains(p, []byte("in state DEAD")) {
		o.sawDead = true
		close(o.dead)
	}
	return len(p), nil
}

func (o *fioOutput) bytes() []byte {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]byte(nil), o.b...)
}

// stopLoads stops every writer and fio loop and checks each journaled
// disk block by block.
func (s *soak) stopLoads() (journal cell) {
	for _, f := range s.fios {
		close(f.quit)
	}
	for _, f := range s.fios {
		<-f.done
	}
	for _, sd := range s.base {
		if cd := sd.writer; cd != nil {
			cd.stop()
			journal = journal.add(cd.verify(s.t))
			cd.img.Close()
		}
	}
	s.journal = journal
	return journal
}

// writeCSV writes the samples, the baseline first (t_s "start") and the
// end last ("end").
func (s *soak) writeCSV(baseline, end soakSample) {
	var b strings.Builder
	b.WriteString("t_s,daemon_rss_kib,daemon_pss_kib,workers_rss_kib,workers_pss_kib,daemon_fds,workers_fds,sockets,unix_paths,workers,declared,kills\n")
	rows := append(append([]soakSample{baseline}, s.samples...), end)
	for i, m := range rows {
		at := fmt.Sprintf("%.0f", m.at.Seconds())
		switch i {
		case 0:
			at = "start"
		case len(rows) - 1:
			at = "end"
		}
		fmt.Fprintf(&b, "%s,%d,%d,%d,%d,%d,%d,%d,%d,%d,%d,%d\n", at,
			m.daemon.rssKiB, m.daemon.pssKiB, m.workerUsage.rssKiB, m.workerUsage.pssKiB,
			m.daemon.fds, m.workerUsage.fds, m.daemon.sockets+m.workerUsage.sockets, m.unixPaths,
			m.workers, m.declared, m.kills)
	}
	if err := os.WriteFile(filepath.Join(s.out, "samples.csv"), []byte(b.String()), 0o644); err != nil {
		s.t.Error(err)
	}
}

// shutdownAndCheck stops the daemon the way an operator does, requires
// every worker gone with it, and checks every image file at rest.
func (s *soak) shutdownAndCheck(qemuImg string) {
	if _, err := s.d.blktap("shutdown", "--timeout", "120s"); err != nil {
		s.t.Fatal(err)
	}
	<-s.d.done
	deadline := time.Now().Add(10 * time.Second)
	for len(workersOf(s.bin)) != 0 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if left := workersOf(s.bin); len(left) != 0 {
		s.t.Errorf("soak: workers %v outlived the daemon's shutdown", left)
	}
	for _, sd := range append(append([]soakDisk(nil), s.base...), s.extras...) {
		if sd.file == "" {
			continue
		}
		// Leaked clusters (allocated, never referenced: a kill between
		// the two) waste space and harm no data; corruption fails.
		s.leaks += checkLeaks(s.t, sd.name, s.bin, "image", "check", "-f", sd.kind.format, sd.file)
		s.checked++
		if sd.kind.qemu != "raw" && sd.kind.qemu != "qcow" {
			checkLeaks(s.t, sd.name, qemuImg, "check", "-f", sd.kind.qemu, sd.file)
		}
	}
}

// judge compares the end with the baseline and the curves' thirds, and
// prints the one line `make soak` ends with.
func (s *soak) judge(baseline, end soakSample) {
	var fails []string
	fail := func(format string, args ...any) { fails = append(fails, fmt.Sprintf(format, args...)) }
	verified, cut, bad := 0, 0, 0
	for _, f := range s.fios {
		verified, cut, bad = verified+f.verified, cut+f.cut, bad+f.bad
		if f.bad != 0 {
			s.t.Errorf("%s: fio verify failed:\n%s", f.name, f.badOut)
		}
	}
	if bad != 0 {
		fail("%d fio verify failures", bad)
	}
	if n := s.journal.losses + s.journal.bad; n != 0 {
		fail("%d journaled blocks lost or bad", n)
	}
	if end.workers != len(s.base) {
		fail("%d workers for %d disks", end.workers, len(s.base))
	}
	fds := func(m soakSample) int { return m.daemon.fds + m.workerUsage.fds }
	socks := func(m soakSample) int { return m.daemon.sockets + m.workerUsage.sockets }
	if fds(end) > fds(baseline) || socks(end) > socks(baseline) || end.unixPaths > baseline.unixPaths {
		fail("leak: fds %d -> %d, sockets %d -> %d, bound unix sockets %d -> %d",
			fds(baseline), fds(end), socks(baseline), socks(end), baseline.unixPaths, end.unixPaths)
	}
	curves := s.curves()
	for _, c := range curves {
		if c.judged && c.growth > s.memGrowth {
			fail("%s grew %.0f%% from the first third to the last", c.name, 100*c.growth)
		}
	}
	var sum strings.Builder
	fmt.Fprintf(&sum, "%d disks for %v, %d worker kills, %d churn steps; journal: %d writes, %d flushed blocks verified, %d lost, %d bad; fio: %d runs verified, %d cut by kills, %d verify failures; %d images checked, %d leaked clusters; fds %d -> %d, sockets %d -> %d, workers %d/%d",
		len(s.base), s.duration, end.kills, s.churns, s.journal.writes, s.journal.verified, s.journal.losses, s.journal.bad,
		verified, cut, bad, s.checked, s.leaks, fds(baseline), fds(end), socks(baseline), socks(end), end.workers, len(s.base))
	for _, c := range curves {
		fmt.Fprintf(&sum, "\n%-22s %s  first third %.0f, last %.0f (%+.1f%%)", c.name, c.line, c.first, c.last, 100*c.growth)
	}
	verdict := "PASS"
	if len(fails) != 0 || s.t.Failed() {
		verdict = "FAIL"
		fmt.Fprintf(&sum, "\nfailures: %s", strings.Join(fails, "; "))
	}
	text := fmt.Sprintf("SOAK %s: %s\n", verdict, sum.String())
	os.WriteFile(filepath.Join(s.out, "summary.txt"), []byte(text), 0o644)
	fmt.Print(text)
	if len(fails) != 0 {
		s.t.Errorf("soak failed: %s", strings.Join(fails, "; "))
	}
}

// curve is one sampled series with its sparkline and thirds.
type curve struct {
	name, line          string
	first, last, growth float64
	judged              bool // a flat curve is required, not only shown
}

func (s *soak) curves() []curve {
	series := []struct {
		name   string
		judged bool
		of     func(soakSample) int
	}{
		{"daemon RSS KiB", true, func(m soakSample) int { return m.daemon.rssKiB }},
		{"all PSS KiB", true, func(m soakSample) int { return m.daemon.pssKiB + m.workerUsage.pssKiB }},
		{"daemon fds", false, func(m soakSample) int { return m.daemon.fds }},
		{"sockets", false, func(m soakSample) int { return m.daemon.sockets + m.workerUsage.sockets }},
		{"workers", false, func(m soakSample) int { return m.workers }},
	}
	var out []curve
	for _, sr := range series {
		var v []float64
		for _, m := range s.samples {
			v = append(v, float64(sr.of(m)))
		}
		c := curve{name: sr.name, line: sparkline(v), judged: sr.judged}
		c.first, c.last, c.growth = thirdsSlope(v)
		out = append(out, c)
	}
	return out
}
