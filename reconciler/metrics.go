package reconciler

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"runtime"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/blktap-go/blktap/tapengine/worker"
)

// serveMetrics answers GET /metrics on addr for Prometheus: the disks'
// metrics (diskCollector), the build, and the daemon's process and Go
// runtime. Worker processes are not in the process metrics: each is its
// own process, seen through its disk's counters.
func (d *Daemon) serveMetrics(addr string) (stop func(), err error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(d.metricsRegistry(), promhttp.HandlerOpts{
		ErrorLog: slog.NewLogLogger(d.log.Handler(), slog.LevelWarn),
		// One bad histogram from a worker must not hide every other disk.
		ErrorHandling: promhttp.ContinueOnError,
		// Each scrape asks every worker for its counters.
		MaxRequestsInFlight: 4,
	}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("metrics stopped", "err", err)
		}
	}()
	d.log.Info("metrics", "url", "http://"+ln.Addr().String()+"/metrics")
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}, nil
}

// metricsRegistry is the daemon's own registry (never the global one, so
// tests can run daemons side by side).
func (d *Daemon) metricsRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		collectors.NewGoCollector(),
		buildInfo(d.opts.Version, d.opts.Commit),
		diskCollector{source: d.metricsSnapshot},
	)
	return reg
}

// buildInfo is blktap_build_info, always 1: its labels say which build
// runs, so a dashboard can join it onto the other series.
func buildInfo(version, commit string) prometheus.Collector {
	if version == "" {
		version = "(devel)"
	}
	if commit == "" {
		commit = "unknown"
	}
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "blktap_build_info",
		Help: "The running blktap's version, commit and Go release, as labels; always 1.",
		ConstLabels: prometheus.Labels{
			"version": version, "commit": commit, "goversion": runtime.Version(),
		},
	}, func() float64 { return 1 })
}

// deviceRow is what the metrics show of a device beside its worker's
// counters: what its status last said. writeStatus publishes it under
// d.mu because the device itself belongs to its reconcile goroutine.
type deviceRow struct {
	name, phase string
	restarts    int
}

func (d *Daemon) publishRow(k Key, r deviceRow) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.rows == nil {
		d.rows = map[Key]deviceRow{}
	}
	d.rows[k] = r
}

// metricsSnapshot is what one scrape shows: every device's row by
// Key.String(), and the counters of every running worker.
func (d *Daemon) metricsSnapshot() (map[string]deviceRow, []DeviceStats) {
	d.mu.Lock()
	rows := make(map[string]deviceRow, len(d.rows))
	for k, r := range d.rows {
		rows[k.String()] = r
	}
	d.mu.Unlock()
	// stats asks each worker with a deadline of its own, detached from
	// the caller's context, so a scrape needs none.
	return rows, d.stats(context.Background())
}

var (
	labelsDisk    = []string{"disk", "device"}
	descRequests  = newDesc("requests_total", "Requests served, by path (ring: the guest's blkif ring; nbd: the export) and operation (read, write, flush, discard).", "path", "op")
	descBytes     = newDesc("bytes_total", "Bytes moved for guests and dom0 clients, by direction.", "direction")
	descErrors    = newDesc("errors_total", "Requests answered with an error, by path.", "path")
	descInFlight  = newDesc("in_flight", "Image operations under way.")
	descNBDConns  = newDesc("nbd_connections", "NBD clients connected to the disk's export.")
	descRestarts  = newDesc("worker_restarts_total", "Worker processes restarted after a crash.")
	descPhase     = newDesc("device_phase", "The device's phase (blktap ls' PHASE) as the label phase; always 1, one series per device.", "phase")
	descLatency   = newDesc("image_latency_seconds", "Time the image took per operation.", "op")
	diskDescs     = []*prometheus.Desc{descRequests, descBytes, descErrors, descInFlight, descNBDConns, descRestarts, descPhase, descLatency}
	errBadLatency = errors.New("worker sent a malformed latency histogram")
)

func newDesc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc("blktap_"+name, help, append(append([]string{}, labelsDisk...), labels...), nil)
}

// diskCollector reads the daemon's state at each scrape: nothing is kept
// in step with it between scrapes.
type diskCollector struct {
	source func() (map[string]deviceRow, []DeviceStats)
}

func (c diskCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range diskDescs {
		ch <- d
	}
}

func (c diskCollector) Collect(ch chan<- prometheus.Metric) {
	rows, stats := c.source()
	for key, r := range rows {
		ch <- prometheus.MustNewConstMetric(descRestarts, prometheus.CounterValue, float64(r.restarts), r.name, key)
		if r.phase != "" {
			ch <- prometheus.MustNewConstMetric(descPhase, prometheus.GaugeValue, 1, r.name, key, r.phase)
		}
	}
	for _, ds := range stats {
		r, ok := rows[ds.Device]
		// A device shows once its status is written: before, it has no
		// name, and a series renamed a moment later would be a new one.
		if ok && ds.Stats != nil {
			collectIO(ch, r.name, ds.Device, ds.Stats)
		}
	}
}

// opsByPath are the request counters by path and operation. Both paths
// use one vocabulary (NBD's trim is counted as discard) so that a query
// can sum over path.
func opsByPath(st *worker.Stats) []struct {
	path, op string
	n        uint64
} {
	return []struct {
		path, op string
		n        uint64
	}{
		{"ring", "read", st.RingReads}, {"ring", "write", st.RingWrites}, {"ring", "flush", st.RingFlushes},
		{"ring", "discard", st.RingDiscards}, {"nbd", "read", st.NBDReads}, {"nbd", "write", st.NBDWrites},
		{"nbd", "flush", st.NBDFlushes}, {"nbd", "discard", st.NBDTrims},
	}
}

func collectIO(ch chan<- prometheus.Metric, name, key string, st *worker.Stats) {
	counter := func(desc *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(desc, prometheus.CounterValue, float64(v), append([]string{name, key}, labels...)...)
	}
	for _, r := range opsByPath(st) {
		counter(descRequests, r.n, r.path, r.op)
	}
	counter(descBytes, st.BytesRead, "read")
	counter(descBytes, st.BytesWritten, "write")
	counter(descErrors, st.RingErrors, "ring")
	counter(descErrors, st.NBDErrors, "nbd")
	ch <- prometheus.MustNewConstMetric(descInFlight, prometheus.GaugeValue, float64(st.InFlight), name, key)
	ch <- prometheus.MustNewConstMetric(descNBDConns, prometheus.GaugeValue, float64(st.NBDActive), name, key)
	for op, h := range st.Latency {
		count, buckets, err := cumulative(h)
		if err != nil {
			ch <- prometheus.NewInvalidMetric(descLatency, fmt.Errorf("disk %s op %s: %w", key, op, err))
			continue
		}
		ch <- prometheus.MustNewConstHistogram(descLatency, count, h.SumSec, buckets, name, key, op)
	}
}

// cumulative turns a worker's histogram (a count per bucket, the last
// one past every bound) into Prometheus' cumulative buckets by upper
// bound, and the total count, which is the +Inf bucket.
func cumulative(h worker.Histogram) (count uint64, buckets map[float64]uint64, err error) {
	bounds := h.Bounds
	if len(bounds) == 0 {
		bounds = worker.LatencyBounds // a worker from before the bounds were sent
	}
	if len(h.Buckets) != len(bounds)+1 {
		return 0, nil, fmt.Errorf("%w: %d buckets for %d bounds", errBadLatency, len(h.Buckets), len(bounds))
	}
	buckets = make(map[float64]uint64, len(bounds))
	for i, le := range bounds {
		if math.IsNaN(le) || math.IsInf(le, 0) || i > 0 && !(le > bounds[i-1]) {
			return 0, nil, fmt.Errorf("%w: bound %v after %v", errBadLatency, le, bounds[max(i-1, 0)])
		}
		count += h.Buckets[i]
		buckets[le] = count
	}
	return count + h.Buckets[len(bounds)], buckets, nil
}
