package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blktap-go/blktap/internal/oracle"
)

// fioIOPS runs a 4k random-read fio job against uri and returns its IOPS.
func fioIOPS(t *testing.T, fio, uri string, seconds int) float64 {
	t.Helper()
	out, err := exec.Command(fio, "--name=qos", "--ioengine=nbd", "--uri="+uri, "--rw=randread",
		"--bs=4k", "--iodepth=8", "--size=16M", "--time_based", fmt.Sprintf("--runtime=%d", seconds),
		"--output-format=json").CombinedOutput()
	if err != nil {
		t.Fatalf("fio: %v\n%s", err, out)
	}
	var res struct {
		Jobs []struct {
			Read struct {
				IOPS float64 `json:"iops"`
			} `json:"read"`
		} `json:"jobs"`
	}
	js := string(out)
	if err := json.Unmarshal([]byte(js[strings.Index(js, "{"):]), &res); err != nil || len(res.Jobs) != 1 {
		t.Fatalf("fio output: %v\n%s", err, out)
	}
	return res.Jobs[0].Read.IOPS
}

// QoS from the YAML: a limited disk runs at its limit while an unlimited
// one beside it keeps its speed; a new limit applies live.
func TestEndToEndQoS(t *testing.T) {
	fio := oracle.Require(t, "fio")
	bin := buildBinary(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "disks.yaml")
	yaml := func(iops int) string {
		return fmt.Sprintf(`disks:
  - {name: slow, image: %[1]s/slow.raw, format: raw, device: xvdb, create: {size: 32M}, qos: {iops: %[2]d}}
  - {name: fast, image: %[1]s/fast.raw, format: raw, device: xvdc, create: {size: 32M}}
`, dir, iops)
	}
	if err := os.WriteFile(cfg, []byte(yaml(500)), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startDaemon(t, bin, cfg)
	rows := d.waitConnected("slow", "fast")
	solo := fioIOPS(t, fio, rows["fast"].Export, 3)

	// A limit is a ceiling: a run above it is a defect at once, a run
	// below it may be a loaded machine (go test runs packages side by
	// side), so that is measured again, up to three times.
	within := func(what string, limit float64, measure func() (float64, float64)) {
		t.Helper()
		for try := 1; ; try++ {
			got, other := measure()
			t.Logf("%s: limited %.0f IOPS (limit %.0f), unlimited disk beside it %.0f (alone %.0f)", what, got, limit, other, solo)
			if got > 1.1*limit {
				t.Fatalf("%s: the limited disk ran at %.0f IOPS, over its limit %.0f by more than 10%%", what, got, limit)
			}
			if got >= 0.9*limit && (other == 0 || other > 4*got) {
				return
			}
			if try == 3 {
				t.Fatalf("%s: limited %.0f (want %.0f +- 10%%), unlimited %.0f beside it", what, got, limit, other)
			}
		}
	}
	within("limit 500", 500, func() (float64, float64) {
		var slow, fast float64
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); slow = fioIOPS(t, fio, rows["slow"].Export, 4) }()
		go func() { defer wg.Done(); fast = fioIOPS(t, fio, rows["fast"].Export, 4) }()
		wg.Wait()
		return slow, fast
	})

	tmp := cfg + ".tmp"
	if err := os.WriteFile(tmp, []byte(yaml(1000)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, cfg); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second) // debounce + reconcile
	within("live change to 1000", 1000, func() (float64, float64) {
		return fioIOPS(t, fio, rows["slow"].Export, 3), 0
	})
	if r, _ := d.row("slow"); r.WorkerPid != rows["slow"].WorkerPid {
		t.Errorf("the QoS change restarted the worker")
	}
}
