package reconciler

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
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
	// Answered by the API alone, so a client that only needs to know the
	// daemon is there does not wait on every busy worker's counters.
	mux.HandleFunc("GET /v1/ping", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(PingReply{Pid: os.Getpid()})
	})
	mux.HandleFunc("GET /v1/stats", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(d.stats(r.Context()))
	})
	mux.HandleFunc("POST /v1/devices/{kind}/{domid}/{devid}/{op}", func(w http.ResponseWriter, r *http.Request) {
		var req DeviceOp
		if r.ContentLength != 0 {
			if err := json.NewDecoder(io.LimitReader(r.Body, 64<<10)).Decode(&req); err != nil {
				http.Error(w, "bad request body: "+err.Error(), http.StatusBadRequest)
				return
			}
		}
		k, err := keyFromPath(r.PathValue("kind"), r.PathValue("domid"), r.PathValue("devid"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Minute)
		defer cancel()
		switch r.PathValue("op") {
		case "pause":
			err = d.request(ctx, k, RequestPause, req)
		case "resume":
			err = d.request(ctx, k, RequestResume, req)
		case "snapshot":
			err = d.request(ctx, k, RequestSnapshot, req)
		default:
			http.Error(w, "unknown operation", http.StatusNotFound)
			return
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusConflict)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("POST /v1/shutdown", func(w http.ResponseWriter, r *http.Request) {
		// Answered once every disk is closed; the daemon then exits.
		d.log.Info("shutdown requested over the API")
		d.shutdown.request()
		select {
		case <-d.shutdown.done:
		case <-r.Context().Done():
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(ShutdownReply{Pid: os.Getpid(), Closed: d.shutdown.closed})
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
	procs := make(map[Key]*worker.Process, len(d.views))
	for k, v := range d.views {
		procs[k] = v.proc
	}
	d.mu.Unlock()
	// Asked all at once: a worker busy serving answers late, and one after
	// another those delays added up to seconds under load (issue 16).
	out := make([]DeviceStats, 0, len(procs))
	var mu sync.Mutex
	var wg sync.WaitGroup
	for k, p := range procs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			e := DeviceStats{Device: k.String(), WorkerPid: p.Pid()}
			// Not the request's context: a call cut short kills the
			// worker (its stream could pair a late reply with the next
			// request), and a client that gave up must not restart disks.
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			rep, err := p.Call(cctx, worker.Request{Op: worker.OpStats})
			cancel()
			if err != nil {
				e.Error = err.Error()
			} else {
				e.Stats = rep.Stats
			}
			mu.Lock()
			out = append(out, e)
			mu.Unlock()
		}()
	}
	wg.Wait()
	sort.Slice(out, func(i, j int) bool { return out[i].Device < out[j].Device })
	return out
}

// DeviceOp is the body of POST /v1/devices/KIND/DOMID/DEVID/OP.
type DeviceOp struct {
	Format string `json:"format,omitempty"` // resume: the new image's; snapshot: the overlay's
	Path   string `json:"path,omitempty"`
	// Name is snapshot's NEWFILE as typed: for an rbd disk a snapshot
	// name or an rbd: clone, which Path (made absolute) would spoil.
	Name string `json:"name,omitempty"`
}

func keyFromPath(kind, dom, dev string) (Key, error) {
	k, ok := parseBackendPath("/b", "/b/"+kind+"/"+dom+"/"+dev)
	if !ok {
		return Key{}, fmt.Errorf("no such device %s/%s/%s", kind, dom, dev)
	}
	return k, nil
}

// DeviceCall asks a running daemon to pause, resume or snapshot a device.
func DeviceCall(ctx context.Context, stateDir string, k Key, op string, body DeviceOp) error {
	c := apiClient(stateDir)
	b, _ := json.Marshal(body)
	req, err := http.NewRequestWithContext(ctx, "POST",
		fmt.Sprintf("http://blktap/v1/devices/%s/%d/%d/%s", k.Kind, k.Domid, k.Devid, op), bytes.NewReader(b))
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return fmt.Errorf("daemon: %w (is `blktap run` running?)", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("%s", strings.TrimSpace(string(msg)))
	}
	return nil
}

func apiClient(stateDir string) *http.Client {
	sock := filepath.Join(stateDir, APISocket)
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
}

// PingReply is the body of GET /v1/ping.
type PingReply struct {
	Pid int `json:"pid"`
}

// Ping returns once the daemon serving stateDir answers its API. A daemon
// from before /v1/ping answers it 404 and is asked for its counters
// instead, which it has always served.
func Ping(ctx context.Context, stateDir string) error {
	req, err := http.NewRequestWithContext(ctx, "GET", "http://blktap/v1/ping", nil)
	if err != nil {
		return err
	}
	resp, err := apiClient(stateDir).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusNotFound:
		_, err = FetchStats(ctx, stateDir)
		return err
	case resp.StatusCode/100 != 2:
		return fmt.Errorf("daemon: %s", resp.Status)
	}
	var rep PingReply
	if err := json.NewDecoder(io.LimitReader(resp.Body, 4096)).Decode(&rep); err != nil {
		return fmt.Errorf("daemon's answer: %w", err)
	}
	return nil
}

// FetchStats asks a running daemon for its devices' counters.
func FetchStats(ctx context.Context, stateDir string) ([]DeviceStats, error) {
	c := apiClient(stateDir)
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

// Shutdown asks the daemon serving stateDir to flush and close every disk
// and exit, and returns once the disks are closed (the daemon's process
// may take a moment more to exit: see ShutdownReply.Pid).
func Shutdown(ctx context.Context, stateDir string) (ShutdownReply, error) {
	var rep ShutdownReply
	req, err := http.NewRequestWithContext(ctx, "POST", "http://blktap/v1/shutdown", nil)
	if err != nil {
		return rep, err
	}
	resp, err := apiClient(stateDir).Do(req)
	if err != nil {
		return rep, fmt.Errorf("no daemon answers on %s: %w", filepath.Join(stateDir, APISocket), err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return rep, fmt.Errorf("daemon: %s: %s", resp.Status, strings.TrimSpace(string(msg)))
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&rep); err != nil {
		return rep, fmt.Errorf("daemon's answer: %w", err)
	}
	return rep, nil
}
