package reconciler

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"path/filepath"
	"sort"
	"time"

	"github.com/blktap-go/blktap/tapengine/worker"
)

// APISocket, in the state directory, answers the CLI's questions that
// xenstore does not hold: live I/O counters. Mode 0600.
const APISocket = "blktap.sock"

// DeviceStats is one entry of GET /v1/stats.
type DeviceStats struct {
	Device    string        `json:"device"` // Key.String()
	WorkerPid int           `json:"worker_pid"`
	Stats     *worker.Stats `json:"stats,omitempty"`
	Error     string        `json:"error,omitempty"`
}

func (d *Daemon) serveAPI() (stop func(), err error) {
	ln, err := listenUnix(filepath.Join(d.opts.StateDir, APISocket), 0o600)
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/stats", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(d.stats(r.Context()))
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("api stopped", "err", err)
		}
	}()
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}, nil
}

func (d *Daemon) stats(ctx context.Context) []DeviceStats {
	d.mu.Lock()
	procs := make(map[Key]*worker.Process, len(d.procs))
	for k, p := range d.procs {
		procs[k] = p
	}
	d.mu.Unlock()
	out := []DeviceStats{}
	for k, p := range procs {
		e := DeviceStats{Device: k.String(), WorkerPid: p.Pid()}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		rep, err := p.Call(cctx, worker.Request{Op: worker.OpStats})
		cancel()
		if err != nil {
			e.Error = err.Error()
		} else {
			e.Stats = rep.Stats
		}
		out = append(out, e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Device < out[j].Device })
	return out
}

// FetchStats asks a running daemon for its devices' counters.
func FetchStats(ctx context.Context, stateDir string) ([]DeviceStats, error) {
	sock := filepath.Join(stateDir, APISocket)
	c := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	req, err := http.NewRequestWithContext(ctx, "GET", "http://blktap/v1/stats", nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var out []DeviceStats
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return nil, err
	}
	return out, nil
}
