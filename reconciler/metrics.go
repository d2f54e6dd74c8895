package reconciler

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/blktap-go/blktap/tapengine/worker"
)

// serveMetrics answers GET /metrics on addr in the Prometheus text format
// (version 0.0.4): per disk, requests by path and operation, bytes,
// errors, operations in flight, the image's latency histogram, and worker
// restarts.
func (d *Daemon) serveMetrics(addr string) (stop func(), err error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		d.writeMetrics(r.Context(), w)
	})
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

type metricFamily struct {
	name, help, kind string
	lines            []string
}

func (d *Daemon) writeMetrics(ctx context.Context, w io.Writer) {
	stats := d.stats(ctx)
	d.mu.Lock()
	names := map[string]string{}
	restarts := map[string]int{}
	for k, dev := range d.devices {
		names[k.String()] = dev.name
		restarts[k.String()] = dev.restarts
	}
	d.mu.Unlock()
	fams := map[string]*metricFamily{}
	add := func(name, help, kind, labels string, v float64) {
		f := fams[name]
		if f == nil {
			f = &metricFamily{name: name, help: help, kind: kind}
			fams[name] = f
		}
		f.lines = append(f.lines, fmt.Sprintf("%s{%s} %s", name, labels, strconv.FormatFloat(v, 'g', -1, 64)))
	}
	for _, ds := range stats {
		disk := fmt.Sprintf("disk=%q,device=%q", names[ds.Device], ds.Device)
		add("blktap_worker_restarts_total", "Worker processes restarted after a crash.", "counter", disk, float64(restarts[ds.Device]))
		st := ds.Stats
		if st == nil {
			continue
		}
		req := "blktap_requests_total"
		const reqHelp = "Requests served, by path (ring: the guest's blkif ring; nbd: the export) and operation."
		for _, r := range []struct {
			path, op string
			n        uint64
		}{
			{"ring", "read", st.RingReads}, {"ring", "write", st.RingWrites}, {"ring", "flush", st.RingFlushes},
			{"ring", "discard", st.RingDiscards}, {"nbd", "read", st.NBDReads}, {"nbd", "write", st.NBDWrites},
			{"nbd", "flush", st.NBDFlushes}, {"nbd", "trim", st.NBDTrims},
		} {
			add(req, reqHelp, "counter", fmt.Sprintf("%s,path=%q,op=%q", disk, r.path, r.op), float64(r.n))
		}
		add("blktap_bytes_total", "Bytes moved for guests and dom0 clients, by direction.", "counter", disk+`,direction="read"`, float64(st.BytesRead))
		add("blktap_bytes_total", "", "", disk+`,direction="write"`, float64(st.BytesWritten))
		add("blktap_errors_total", "Requests answered with an error, by path.", "counter", disk+`,path="ring"`, float64(st.RingErrors))
		add("blktap_errors_total", "", "", disk+`,path="nbd"`, float64(st.NBDErrors))
		add("blktap_in_flight", "Image operations under way.", "gauge", disk, float64(st.InFlight))
		add("blktap_nbd_connections", "NBD clients connected to the disk's export.", "gauge", disk, float64(st.NBDActive))
		ops := make([]string, 0, len(st.Latency))
		for op := range st.Latency {
			ops = append(ops, op)
		}
		sort.Strings(ops)
		for _, op := range ops {
			h := st.Latency[op]
			lbl := fmt.Sprintf("%s,op=%q", disk, op)
			var cum uint64
			for i, c := range h.Buckets {
				cum += c
				le := "+Inf"
				if i < len(worker.LatencyBounds) {
					le = strconv.FormatFloat(worker.LatencyBounds[i], 'g', -1, 64)
				}
				add("blktap_image_latency_seconds_bucket", "Time the image took per operation.", "histogram", fmt.Sprintf("%s,le=%q", lbl, le), float64(cum))
			}
			add("blktap_image_latency_seconds_sum", "", "", lbl, h.SumSec)
			add("blktap_image_latency_seconds_count", "", "", lbl, float64(h.Count))
		}
	}
	// A histogram's _sum and _count belong to its family's block.
	order := []string{"blktap_requests_total", "blktap_bytes_total", "blktap_errors_total", "blktap_in_flight",
		"blktap_nbd_connections", "blktap_worker_restarts_total"}
	var b strings.Builder
	for _, name := range order {
		if f := fams[name]; f != nil {
			fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n%s\n", f.name, f.help, f.name, f.kind, strings.Join(f.lines, "\n"))
		}
	}
	if f := fams["blktap_image_latency_seconds_bucket"]; f != nil {
		fmt.Fprintf(&b, "# HELP blktap_image_latency_seconds %s\n# TYPE blktap_image_latency_seconds histogram\n", f.help)
		b.WriteString(strings.Join(f.lines, "\n") + "\n")
		for _, n := range []string{"blktap_image_latency_seconds_sum", "blktap_image_latency_seconds_count"} {
			if g := fams[n]; g != nil {
				b.WriteString(strings.Join(g.lines, "\n") + "\n")
			}
		}
	}
	io.WriteString(w, b.String())
}
