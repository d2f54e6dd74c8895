package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// rssKiB is a process's resident set size.
func rssKiB(pid int) int64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			n, _ := strconv.ParseInt(strings.Fields(v)[0], 10, 64)
			return n
		}
	}
	return 0
}

// answers reports whether an NBD server greets on the unix socket.
func answers(uri string) bool {
	sock := strings.TrimPrefix(uri, "nbd+unix:///?socket=")
	c, err := net.DialTimeout("unix", sock, 2*time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	b := make([]byte, 8)
	_, err = io.ReadFull(c, b)
	return err == nil && string(b) == "NBDMAGIC"
}

// BenchmarkConvergence: N raw disks in the YAML, created on demand, from
// the daemon's start to every disk Connected with its export answering;
// reports seconds and the RSS per disk of the daemon and workers.
// go test -run '^$' -bench Convergence -benchtime 1x ./cmd/blktap
func BenchmarkConvergence(b *testing.B) {
	bin := buildBinary(b)
	for _, n := range []int{16, 64, 256} {
		b.Run(strconv.Itoa(n), func(b *testing.B) {
			for range b.N {
				dir := b.TempDir()
				cfg := filepath.Join(dir, "disks.yaml")
				var sb strings.Builder
				sb.WriteString("disks:\n")
				names := make([]string, n)
				for i := range n {
					names[i] = fmt.Sprintf("d%03d", i)
					// xvd disks 0..15 and then the extended numbering.
					fmt.Fprintf(&sb, "  - {name: %s, image: %s/%s.raw, format: raw, device: %d, create: {size: 64M}}\n",
						names[i], dir, names[i], 1<<28|i<<8)
				}
				if err := os.WriteFile(cfg, []byte(sb.String()), 0o644); err != nil {
					b.Fatal(err)
				}
				start := time.Now()
				d := startDaemon(b, bin, cfg)
				rows := d.waitConnectedWithin(3*time.Minute, names...)
				for _, name := range names {
					if !answers(rows[name].Export) {
						b.Fatalf("%s: export does not answer", name)
					}
				}
				elapsed := time.Since(start)
				var rss int64
				rss += rssKiB(d.cmd.Process.Pid)
				for _, r := range rows {
					rss += rssKiB(r.WorkerPid)
				}
				b.ReportMetric(elapsed.Seconds(), "s/converge")
				b.ReportMetric(float64(rss)/1024/float64(n), "MiB-RSS/disk")
			}
		})
	}
}
