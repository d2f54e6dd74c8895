package nbd

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/oracle"
)

// BenchmarkFio measures this server against qemu-nbd and nbdkit serving
// the same warm raw file, with fio's nbd engine as the one client
// (docs/PERFORMANCE.md: 4k, QD32). Each iteration is a 5 s fio
// run; use -benchtime=1x. Metrics: IOPS per workload.
//
//	go test -run XXX -bench Fio -benchtime 1x ./tapengine/nbd
func BenchmarkFio(b *testing.B) {
	fio := oracle.Require(b, "fio")
	const size = 256 << 20
	dir := b.TempDir()
	path := filepath.Join(dir, "disk.raw")
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	for off := 0; off < size; off += len(buf) {
		f.Write(buf)
	}
	f.Close()

	servers := map[string]func(b *testing.B, sock string) func(){
		"blktap": func(b *testing.B, sock string) func() {
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				b.Fatal(err)
			}
			_, real, _ := startServer(b, Export{Backend: &fileBackend{f: f, size: size}})
			if err := os.Symlink(real, sock); err != nil {
				b.Fatal(err)
			}
			return func() { f.Close() }
		},
		"qemu-nbd": func(b *testing.B, sock string) func() {
			return spawn(b, sock, oracle.Require(b, "qemu-nbd"), "-f", "raw", "-t", "-e", "4", "-k", sock, path)
		},
		"nbdkit": func(b *testing.B, sock string) func() {
			return spawn(b, sock, oracle.Require(b, "nbdkit"), "-f", "-U", sock, "file", "file="+path)
		},
	}
	for _, name := range []string{"blktap", "qemu-nbd", "nbdkit"} {
		b.Run(name, func(b *testing.B) {
			sock := filepath.Join(b.TempDir(), name+".sock")
			stop := servers[name](b, sock)
			defer stop()
			uri := "nbd+unix:///?socket=" + sock
			for b.Loop() {
				for _, rw := range []string{"randread", "randwrite"} {
					iops := fioIOPS(b, fio, uri, rw)
					b.ReportMetric(iops, rw+"-IOPS")
				}
			}
		})
	}
}

func spawn(b testing.TB, sock, bin string, args ...string) func() {
	cmd := exec.Command(bin, args...)
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	return func() { cmd.Process.Kill(); cmd.Wait() }
}

func fioIOPS(b *testing.B, fio, uri, rw string) float64 {
	out, err := exec.Command(fio, "--name=bench", "--ioengine=nbd", "--uri="+uri, "--rw="+rw,
		"--bs=4k", "--iodepth=32", "--runtime=5", "--time_based", "--size=256M",
		"--output-format=json").CombinedOutput()
	if err != nil {
		b.Fatalf("fio: %v\n%s", err, out)
	}
	var res struct {
		Jobs []struct {
			Read  struct{ IOPS float64 } `json:"read"`
			Write struct{ IOPS float64 } `json:"write"`
		} `json:"jobs"`
	}
	s := string(out)
	if i := strings.Index(s, "{"); i >= 0 {
		s = s[i:]
	}
	if err := json.Unmarshal([]byte(s), &res); err != nil || len(res.Jobs) == 0 {
		b.Fatalf("fio output: %v\n%s", err, out)
	}
	if rw == "randread" {
		return res.Jobs[0].Read.IOPS
	}
	return res.Jobs[0].Write.IOPS
}
