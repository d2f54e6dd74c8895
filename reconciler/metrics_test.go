package reconciler

import (
	"io"
	"log/slog"
	"math"
	"runtime"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/blktap-go/blktap/tapengine/worker"
)

// fakeScrape is one scrape's worth of daemon state: a connected disk
// whose worker served both paths, a failed one with no worker, and a
// worker whose device has no status yet.
func fakeScrape() (map[string]deviceRow, []DeviceStats) {
	write := worker.Histogram{Bounds: worker.LatencyBounds, Buckets: make([]uint64, len(worker.LatencyBounds)+1), SumSec: 0.75}
	write.Buckets[0], write.Buckets[2], write.Buckets[15] = 1, 2, 1
	rows := map[string]deviceRow{
		"vbd3/1/51728": {name: "d1-xvdb", phase: PhaseConnected, restarts: 2},
		"vbd3/0/51744": {name: "scratch", phase: PhaseFailed},
	}
	stats := []DeviceStats{
		{Device: "vbd3/1/51728", Stats: &worker.Stats{
			RingReads: 3, RingWrites: 4, RingFlushes: 5, RingDiscards: 6,
			NBDReads: 7, NBDWrites: 8, NBDFlushes: 9, NBDTrims: 10,
			BytesRead: 4096, BytesWritten: 8192, RingErrors: 1, NBDErrors: 2,
			InFlight: 3, NBDActive: 1,
			Latency: map[string]worker.Histogram{"write": write},
		}},
		{Device: "vbd3/2/51712", Stats: &worker.Stats{RingReads: 99}},
	}
	return rows, stats
}

// The disk metrics exactly: cumulative histogram buckets, and one
// operation vocabulary on both paths (the NBD trim counted as discard).
func TestMetricsExposition(t *testing.T) {
	c := diskCollector{source: fakeScrape}
	const d1 = `device="vbd3/1/51728",disk="d1-xvdb"`
	want := `
# HELP blktap_device_phase The device's phase (blktap ls' PHASE) as the label phase; always 1, one series per device.
# TYPE blktap_device_phase gauge
blktap_device_phase{device="vbd3/0/51744",disk="scratch",phase="failed"} 1
blktap_device_phase{device="vbd3/1/51728",disk="d1-xvdb",phase="connected"} 1
# HELP blktap_worker_restarts_total Worker processes restarted after a crash.
# TYPE blktap_worker_restarts_total counter
blktap_worker_restarts_total{device="vbd3/0/51744",disk="scratch"} 0
blktap_worker_restarts_total{device="vbd3/1/51728",disk="d1-xvdb"} 2
# HELP blktap_requests_total Requests served, by path (ring: the guest's blkif ring; nbd: the export) and operation (read, write, flush, discard).
# TYPE blktap_requests_total counter
blktap_requests_total{D,op="discard",path="nbd"} 10
blktap_requests_total{D,op="discard",path="ring"} 6
blktap_requests_total{D,op="flush",path="nbd"} 9
blktap_requests_total{D,op="flush",path="ring"} 5
blktap_requests_total{D,op="read",path="nbd"} 7
blktap_requests_total{D,op="read",path="ring"} 3
blktap_requests_total{D,op="write",path="nbd"} 8
blktap_requests_total{D,op="write",path="ring"} 4
# HELP blktap_errors_total Requests answered with an error, by path.
# TYPE blktap_errors_total counter
blktap_errors_total{D,path="nbd"} 2
blktap_errors_total{D,path="ring"} 1
# HELP blktap_in_flight Image operations under way.
# TYPE blktap_in_flight gauge
blktap_in_flight{D} 3
# HELP blktap_image_latency_seconds Time the image took per operation.
# TYPE blktap_image_latency_seconds histogram
`
	// The write histogram: buckets 1, 0, 2, then nothing until one past
	// every bound, so cumulative 1, 1, 3, ..., 3 and +Inf 4.
	var hist strings.Builder
	for i, le := range []string{"1e-05", "2.5e-05", "5e-05", "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "1"} {
		n := "3"
		if i < 2 {
			n = "1"
		}
		hist.WriteString(`blktap_image_latency_seconds_bucket{D,op="write",le="` + le + `"} ` + n + "\n")
	}
	hist.WriteString(`blktap_image_latency_seconds_bucket{D,op="write",le="+Inf"} 4` + "\n")
	hist.WriteString(`blktap_image_latency_seconds_sum{D,op="write"} 0.75` + "\n")
	hist.WriteString(`blktap_image_latency_seconds_count{D,op="write"} 4` + "\n")
	want = strings.ReplaceAll(want+hist.String(), "{D,", "{"+d1+",")
	want = strings.ReplaceAll(want, "{D}", "{"+d1+"}")
	err := testutil.CollectAndCompare(c, strings.NewReader(want),
		"blktap_device_phase", "blktap_worker_restarts_total", "blktap_requests_total",
		"blktap_errors_total", "blktap_in_flight", "blktap_image_latency_seconds")
	if err != nil {
		t.Fatal(err)
	}
	// The worker whose device has no status yet shows nothing.
	if n := testutil.CollectAndCount(c, "blktap_bytes_total"); n != 2 {
		t.Fatalf("blktap_bytes_total: %d series, want 2 (one disk, two directions)", n)
	}
}

// The whole registry the daemon serves passes promlint, and carries the
// build, process and Go runtime metrics.
func TestMetricsRegistryLint(t *testing.T) {
	d := &Daemon{opts: Options{Version: "1.2.3", Commit: "abc"}, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	d.publishRow(Key{Kind: KindVBD3, Domid: 1, Devid: 51728}, deviceRow{name: "d1", phase: PhasePaused})
	reg := d.metricsRegistry()
	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
	want := `
# HELP blktap_build_info The running blktap's version, commit and Go release, as labels; always 1.
# TYPE blktap_build_info gauge
blktap_build_info{commit="abc",goversion="` + runtime.Version() + `",version="1.2.3"} 1
# HELP blktap_device_phase The device's phase (blktap ls' PHASE) as the label phase; always 1, one series per device.
# TYPE blktap_device_phase gauge
blktap_device_phase{device="vbd3/1/51728",disk="d1",phase="paused"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "blktap_build_info", "blktap_device_phase"); err != nil {
		t.Error(err)
	}
	for _, name := range []string{"process_cpu_seconds_total", "process_resident_memory_bytes", "go_goroutines", "go_gc_duration_seconds"} {
		if n, err := testutil.GatherAndCount(reg, name); err != nil || n != 1 {
			t.Errorf("%s: %d series, %v", name, n, err)
		}
	}
	// A device the daemon forgets leaves the metrics.
	d.devices = map[Key]*device{}
	d.forget(&device{key: Key{Kind: KindVBD3, Domid: 1, Devid: 51728}})
	if n := testutil.CollectAndCount(diskCollector{source: d.metricsSnapshot}); n != 0 {
		t.Errorf("%d series after forget", n)
	}
}

// A malformed histogram from a worker fails that series alone: the
// handler (ContinueOnError) still serves the rest.
func TestMetricsBadHistogram(t *testing.T) {
	for name, h := range map[string]worker.Histogram{
		"short":          {Bounds: []float64{1, 2}, Buckets: []uint64{1, 2}},
		"not-increasing": {Bounds: []float64{2, 1}, Buckets: []uint64{1, 2, 3}},
		"infinite-bound": {Bounds: []float64{1, math.Inf(1)}, Buckets: []uint64{1, 2, 3}},
	} {
		src := func() (map[string]deviceRow, []DeviceStats) {
			return map[string]deviceRow{"vbd3/1/51728": {name: "d", phase: PhaseConnected}},
				[]DeviceStats{{Device: "vbd3/1/51728", Stats: &worker.Stats{RingReads: 1, Latency: map[string]worker.Histogram{"read": h}}}}
		}
		reg := prometheus.NewRegistry()
		reg.MustRegister(diskCollector{source: src})
		fams, err := reg.Gather()
		if err == nil || !strings.Contains(err.Error(), errBadLatency.Error()) {
			t.Errorf("%s: gather error %v, want %v", name, err, errBadLatency)
		}
		served := map[string]bool{}
		for _, f := range fams {
			served[f.GetName()] = true
		}
		if !served["blktap_requests_total"] || served["blktap_image_latency_seconds"] {
			t.Errorf("%s: served %v, want the counters and not the bad histogram", name, served)
		}
	}
}

func TestCumulativeMatchesWorkerBounds(t *testing.T) {
	h := worker.Histogram{Buckets: make([]uint64, len(worker.LatencyBounds)+1)} // no Bounds: an older worker
	for i := range h.Buckets {
		h.Buckets[i] = uint64(i + 1)
	}
	count, b, err := cumulative(h)
	if err != nil {
		t.Fatal(err)
	}
	n := uint64(len(h.Buckets))
	if count != n*(n+1)/2 || b[worker.LatencyBounds[0]] != 1 || b[1] != (n-1)*n/2 || len(b) != len(worker.LatencyBounds) {
		t.Fatalf("count %d buckets %v", count, b)
	}
}
