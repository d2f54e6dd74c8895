package main

import (
	"io"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/oracle"
)

// --metrics: per-disk counters, in-flight and the latency histogram in
// the Prometheus text format, after real I/O through the ring.
func TestEndToEndMetrics(t *testing.T) {
	qemuIO := oracle.Require(t, "qemu-io")
	bin := buildBinary(t)
	dir := t.TempDir()
	addr := freeLoopbackPort(t)
	state, _ := os.MkdirTemp("", "bt-state-")
	defer os.RemoveAll(state)
	cmd := exec.Command(bin, "run", "--state-dir", state, "--image-dir", dir, "--metrics", addr)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d := &daemon{t: t, bin: bin, stateDir: state, cmd: cmd, done: make(chan error, 1)}
	go func() { d.done <- cmd.Wait() }()
	defer stopDaemon(t, bin, state, cmd, d.done)
	d.waitAnswering()
	img := dir + "/m.raw"
	if out, err := exec.Command(bin, "image", "create", "-f", "raw", img, "8M").CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	uri := d.attachURI("1", "aio:"+img, "xvdb", "w")
	runTool(t, qemuIO, "-f", "raw", uri, "-c", "write 0 1M", "-c", "read 0 1M")

	var body string
	for i := 0; i < 50; i++ {
		resp, err := http.Get("http://" + addr + "/metrics")
		if err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			body = string(b)
			if strings.Contains(body, "blktap_requests_total") {
				break
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	sample := regexp.MustCompile(`^([a-z_]+)\{([^}]*)\} ([-+0-9.eE]+|\+Inf)$`)
	types := map[string]int{}
	values := map[string]float64{}
	for _, line := range strings.Split(strings.TrimSpace(body), "\n") {
		if strings.HasPrefix(line, "# TYPE ") {
			types[strings.Fields(line)[2]]++
			continue
		}
		if strings.HasPrefix(line, "# HELP ") {
			continue
		}
		m := sample.FindStringSubmatch(line)
		if m == nil {
			t.Fatalf("not a Prometheus sample line: %q", line)
		}
		v, err := strconv.ParseFloat(m[3], 64)
		if err != nil {
			t.Fatalf("%q: %v", line, err)
		}
		values[m[1]+"{"+m[2]+"}"] = v
	}
	for name, n := range types {
		if n != 1 {
			t.Errorf("%s declared %d times", name, n)
		}
	}
	disk := `disk="d1-xvdb",device="vbd3/1/51728"`
	if values["blktap_requests_total{"+disk+`,path="ring",op="write"}`] == 0 ||
		values["blktap_requests_total{"+disk+`,path="ring",op="read"}`] == 0 {
		t.Fatalf("ring requests not counted:\n%s", body)
	}
	if values["blktap_bytes_total{"+disk+`,direction="write"}`] < 1<<20 {
		t.Fatalf("bytes written not counted:\n%s", body)
	}
	count := values["blktap_image_latency_seconds_count{"+disk+`,op="write"}`]
	inf := values["blktap_image_latency_seconds_bucket{"+disk+`,op="write",le="+Inf"}`]
	if count == 0 || inf != count {
		t.Fatalf("write latency histogram: count %v, +Inf bucket %v", count, inf)
	}
}
