package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/blktap-go/blktap/internal/oracle"
)

// --metrics after real I/O on both paths (a guest's ring through the
// local frontend, and a domain-0 export over NBD), a worker crash and a
// pause: promtool accepts the scrape, the counters moved, and the phase
// and restart series say what `blktap ls --json` says.
func TestEndToEndMetrics(t *testing.T) {
	qemuIO := oracle.Require(t, "qemu-io")
	promtool := oracle.Require(t, "promtool")
	bin := buildBinary(t)
	dir := t.TempDir()
	addr := freeLoopbackPort(t)
	d := startDaemon(t, bin, "", "--metrics", addr)
	d.waitAnswering()
	imgs := rawImages(t, bin, dir, "8M", "guest.raw", "dom0.raw")
	ringURI := d.attachURI("1", "aio:"+imgs[0], "xvdb", "w")
	nbdURI := d.attachURI("0", "aio:"+imgs[1], "xvdc", "w")

	// A crash first: the restarted worker's counters start from zero.
	before, _ := d.row("d1-xvdb")
	if err := syscall.Kill(before.WorkerPid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	d.waitRow("d1-xvdb", "restart", func(r lsRow) bool {
		return r.Phase == "connected" && r.WorkerPid > 0 && r.WorkerPid != before.WorkerPid
	})
	runTool(t, qemuIO, "-f", "raw", ringURI, "-c", "write 0 1M", "-c", "read 0 1M")
	runTool(t, qemuIO, "-f", "raw", nbdURI, "-c", "write 0 512k", "-c", "discard 0 64k", "-c", "flush")
	if _, err := d.blktap("pause", "0", "xvdc"); err != nil {
		t.Fatal(err)
	}
	defer d.blktap("resume", "0", "xvdc")
	d.waitRow("d0-xvdc", "pause", func(r lsRow) bool { return r.Phase == "paused" })

	body, fams := scrapeMatchingLs(t, d, addr)
	out, err := runPromtool(promtool, body)
	if err != nil || out != "" {
		t.Fatalf("promtool check metrics: %v\n%s", err, out)
	}
	guest := map[string]string{"disk": "d1-xvdb", "device": "vbd3/1/51728"}
	dom0 := map[string]string{"disk": "d0-xvdc", "device": "vbd3/0/51744"}
	for _, c := range []struct {
		family string
		labels map[string]string
		min    float64
	}{
		{"blktap_requests_total", with(guest, "path", "ring", "op", "write"), 1},
		{"blktap_requests_total", with(guest, "path", "ring", "op", "read"), 1},
		{"blktap_requests_total", with(dom0, "path", "nbd", "op", "write"), 1},
		{"blktap_requests_total", with(dom0, "path", "nbd", "op", "discard"), 1},
		{"blktap_requests_total", with(dom0, "path", "nbd", "op", "flush"), 1},
		{"blktap_bytes_total", with(guest, "direction", "write"), 1 << 20},
		{"blktap_bytes_total", with(dom0, "direction", "write"), 512 << 10},
	} {
		if v := value(t, fams, c.family, c.labels); v < c.min {
			t.Errorf("%s%v = %v, want at least %v", c.family, c.labels, v, c.min)
		}
	}
	for _, m := range fams["blktap_requests_total"].GetMetric() {
		if op := labelMap(m)["op"]; op == "trim" {
			t.Errorf("op=trim still served: both paths say discard")
		}
	}
	h := series(t, fams, "blktap_image_latency_seconds", with(guest, "op", "write")).GetHistogram()
	if h.GetSampleCount() == 0 || h.GetSampleSum() <= 0 {
		t.Errorf("write latency histogram empty: %v", h)
	}
	checkBuildAndRuntime(t, bin, fams)
}

// scrapeMatchingLs scrapes until every device of `blktap ls --json` shows
// exactly one phase series with ls' phase and its restart count (the two
// are written a moment apart), and returns that scrape.
func scrapeMatchingLs(t *testing.T, d *daemon, addr string) (string, map[string]*dto.MetricFamily) {
	t.Helper()
	var why string
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		body := scrape(t, addr)
		parser := expfmt.NewTextParser(model.UTF8Validation)
		fams, err := parser.TextToMetricFamilies(strings.NewReader(body))
		if err != nil {
			t.Fatalf("scrape does not parse: %v\n%s", err, body)
		}
		if why = disagreement(d, fams); why == "" {
			return body, fams
		}
	}
	t.Fatalf("metrics never agreed with ls: %s", why)
	return "", nil
}

// disagreement is how the scrape differs from `blktap ls --json`, or "".
func disagreement(d *daemon, fams map[string]*dto.MetricFamily) string {
	out, err := d.blktap("ls", "--json")
	if err != nil {
		d.t.Fatal(err)
	}
	var rows []struct {
		Name     string `json:"name"`
		Phase    string `json:"phase"`
		Restarts int    `json:"restarts"`
	}
	if err := json.Unmarshal([]byte(out), &rows); err != nil || len(rows) != 2 {
		d.t.Fatalf("ls --json: %v\n%s", err, out)
	}
	phases, restarts := map[string][]string{}, map[string]float64{}
	for _, m := range fams["blktap_device_phase"].GetMetric() {
		l := labelMap(m)
		if m.GetGauge().GetValue() != 1 {
			return fmt.Sprintf("phase series %v is %v, want 1", l, m.GetGauge().GetValue())
		}
		phases[l["disk"]] = append(phases[l["disk"]], l["phase"])
	}
	for _, m := range fams["blktap_worker_restarts_total"].GetMetric() {
		restarts[labelMap(m)["disk"]] = m.GetCounter().GetValue()
	}
	for _, r := range rows {
		if p := phases[r.Name]; len(p) != 1 || p[0] != r.Phase {
			return fmt.Sprintf("%s: ls says %s, metrics %v", r.Name, r.Phase, p)
		}
		if v, ok := restarts[r.Name]; !ok || v != float64(r.Restarts) {
			return fmt.Sprintf("%s: ls says %d restarts, metrics %v", r.Name, r.Restarts, v)
		}
	}
	if restarts["d1-xvdb"] != 1 {
		return fmt.Sprintf("d1-xvdb restarts %v, want the 1 crash", restarts["d1-xvdb"])
	}
	return ""
}

// checkBuildAndRuntime: blktap_build_info says what --version says, and
// the process and Go runtime collectors are served.
func checkBuildAndRuntime(t *testing.T, bin string, fams map[string]*dto.MetricFamily) {
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`^blktap (\S+) \(\S+, commit (\S+), (go\S+)\)`).FindStringSubmatch(string(out))
	if m == nil {
		t.Fatalf("--version: %q", out)
	}
	bi := fams["blktap_build_info"].GetMetric()
	if len(bi) != 1 || bi[0].GetGauge().GetValue() != 1 {
		t.Fatalf("blktap_build_info: %v", bi)
	}
	if l := labelMap(bi[0]); l["version"] != m[1] || l["commit"] != m[2] || l["goversion"] != m[3] {
		t.Errorf("blktap_build_info %v, --version says %q", l, out)
	}
	if v := value(t, fams, "process_resident_memory_bytes", nil); v < 1<<20 {
		t.Errorf("process_resident_memory_bytes %v", v)
	}
	if v := value(t, fams, "go_goroutines", nil); v < 1 {
		t.Errorf("go_goroutines %v", v)
	}
}

func scrape(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %v %s\n%s", err, resp.Status, b)
	}
	return string(b)
}

func runPromtool(promtool, body string) (string, error) {
	c := exec.Command(promtool, "check", "metrics")
	c.Stdin = strings.NewReader(body)
	var out bytes.Buffer
	c.Stdout, c.Stderr = &out, &out
	err := c.Run()
	return strings.TrimSpace(out.String()), err
}

func with(base map[string]string, kv ...string) map[string]string {
	m := map[string]string{}
	for k, v := range base {
		m[k] = v
	}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m
}

func labelMap(m *dto.Metric) map[string]string {
	l := map[string]string{}
	for _, p := range m.GetLabel() {
		l[p.GetName()] = p.GetValue()
	}
	return l
}

// series is the one series of family whose labels include want.
func series(t *testing.T, fams map[string]*dto.MetricFamily, family string, want map[string]string) *dto.Metric {
	t.Helper()
	var found []*dto.Metric
	for _, m := range fams[family].GetMetric() {
		l, ok := labelMap(m), true
		for k, v := range want {
			ok = ok && l[k] == v
		}
		if ok {
			found = append(found, m)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%s%v: %d series", family, want, len(found))
	}
	return found[0]
}

func value(t *testing.T, fams map[string]*dto.MetricFamily, family string, want map[string]string) float64 {
	t.Helper()
	m := series(t, fams, family, want)
	switch {
	case m.Counter != nil:
		return m.GetCounter().GetValue()
	case m.Gauge != nil:
		return m.GetGauge().GetValue()
	}
	return m.GetUntyped().GetValue()
}
