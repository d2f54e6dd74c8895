//go:build rbd

package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/internal/cephdev"
	"github.com/blktap-go/blktap/internal/oracle"
)

type rbdInfo struct {
	Order       int      `json:"order"`
	ObjectSize  int64    `json:"object_size"`
	Features    []string `json:"features"`
	StripeUnit  int64    `json:"stripe_unit"`
	StripeCount int64    `json:"stripe_count"`
	DataPool    string   `json:"data_pool"`
}

// TestRBDCreateOptions: image create's -o keys for rbd reach the image, as
// `rbd info` reports it; an image made with them (striped, in a data
// pool) takes a convert and reads back as qemu-img compare sees it; keys
// librbd would refuse with a bare EINVAL are refused saying why.
func TestRBDCreateOptions(t *testing.T) {
	c := cephdev.Get(t)
	qemuImg := oracle.Require(t, "qemu-img")
	qemuIO := oracle.Require(t, "qemu-io")
	ceph := oracle.Require(t, "ceph")
	bin := buildRBDBinary(t)
	name, spec := c.Name(t)
	dataPool := "dp" + name[:min(len(name), 20)]
	runTool(t, ceph, "-c", c.Conf, "osd", "pool", "create", dataPool, "8")
	c.RBD(t, "pool", "init", dataPool)
	t.Cleanup(func() {
		for _, img := range []string{name, name + "-b"} {
			exec.Command("rbd", "-c", c.Conf, "rm", "--no-progress", "rbd/"+img).Run()
		}
		exec.Command(ceph, "-c", c.Conf, "osd", "pool", "rm", dataPool, dataPool, "--yes-i-really-really-mean-it").Run()
	})
	runTool(t, bin, "image", "create", "-f", "rbd", "-o",
		"cluster_size=1M,features=layering+exclusive-lock+object-map+fast-diff,stripe_unit=256K,stripe_count=2,data_pool="+dataPool,
		"rbd:"+spec, "24M")
	var info rbdInfo
	if err := json.Unmarshal([]byte(c.RBD(t, "info", "--format", "json", "rbd/"+name)), &info); err != nil {
		t.Fatal(err)
	}
	want := rbdInfo{Order: 20, ObjectSize: 1 << 20, StripeUnit: 256 << 10, StripeCount: 2, DataPool: dataPool}
	got := info
	got.Features = nil
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("rbd info: %+v, want %+v", got, want)
	}
	// striping and data-pool are librbd's own marks for what was asked.
	for _, f := range []string{"layering", "exclusive-lock", "object-map", "fast-diff", "striping", "data-pool"} {
		if !slices.Contains(info.Features, f) {
			t.Errorf("rbd info features %v lack %s", info.Features, f)
		}
	}
	if slices.Contains(info.Features, "deep-flatten") {
		t.Errorf("rbd info features %v: deep-flatten was not asked for", info.Features)
	}
	// Data through the striped image in the data pool, written by us.
	src := filepath.Join(t.TempDir(), "src.qcow2")
	runTool(t, qemuImg, "create", "-f", "qcow2", src, "24M")
	runTool(t, qemuIO, "-c", "write -P 0x51 100k 700k", "-c", "write -P 0x52 20M 1M", src)
	b := strings.Replace(spec, name, name+"-b", 1)
	runTool(t, bin, "image", "convert", "-O", "rbd", "-o", "order=16,stripe_unit=16K,stripe_count=4,data_pool="+dataPool, src, "rbd:"+b)
	if out := runTool(t, qemuImg, "compare", "-f", "qcow2", "-F", "raw", src, "rbd:"+b); !strings.Contains(out, "Images are identical") {
		t.Fatalf("qemu-img compare with the striped image:\n%s", out)
	}
	if err := json.Unmarshal([]byte(c.RBD(t, "info", "--format", "json", "rbd/"+name+"-b")), &info); err != nil || info.ObjectSize != 64<<10 || info.StripeCount != 4 {
		t.Errorf("rbd info of the converted image: %+v %v", info, err)
	}

	for opt, why := range map[string]string{
		"features=layering":                        "exclusive-lock",
		"features=exclusive-lock+fast-diff":        "needs object-map",
		"features=exclusive-lock+bogus":            "unknown rbd feature",
		"cluster_size=3M":                          "power of two",
		"order=30":                                 "12 to 25",
		"stripe_unit=64K":                          "go together",
		"stripe_unit=3K,stripe_count=2":            "multiple of 4K",
		"encrypt.format=luks":                      "not supported",
		fmt.Sprintf("data_pool=%s-none", dataPool): "",
	} {
		out, err := exec.Command(bin, "image", "create", "-f", "rbd", "-o", opt, "rbd:"+spec+"x", "8M").CombinedOutput()
		if err == nil || !strings.Contains(string(out), why) {
			t.Errorf("create -o %s: %v %s, want an error saying %q", opt, err, out, why)
		}
	}
	if out := c.RBD(t, "ls"); strings.Contains(out, name+"x") {
		t.Errorf("a refused create left an image behind: %s", out)
	}
}

// TestEndToEndRBDCreateYAML: the desired-state file's create: takes the
// options image create -o does, and the daemon makes the image with them,
// as `rbd info` reports it; a bad value is refused when the file loads.
func TestEndToEndRBDCreateYAML(t *testing.T) {
	c, qemuIO, bin, name, spec := rbdTest(t)
	yaml := filepath.Join(t.TempDir(), "disks.yaml")
	os.WriteFile(yaml, []byte(fmt.Sprintf("disks:\n  - {name: vm1, format: rbd, image: %q, domain: 0, device: xvdb,\n"+
		"     create: {size: 24M, object-size: 1M, features: [layering, exclusive-lock], stripe-unit: 128K, stripe-count: 4}}\n", spec)), 0o644)
	d := startDaemon(t, bin, yaml)
	row := d.waitConnected("vm1")["vm1"]
	runTool(t, qemuIO, "-f", "raw", "-c", "write -P 0x71 0 3M", row.Export)
	var info rbdInfo
	if err := json.Unmarshal([]byte(c.RBD(t, "info", "--format", "json", "rbd/"+name)), &info); err != nil {
		t.Fatal(err)
	}
	// librbd lists features in bit order, and marks striping itself; the
	// pool's defaults would have added object-map, fast-diff, deep-flatten.
	want := rbdInfo{Order: 20, ObjectSize: 1 << 20, StripeUnit: 128 << 10, StripeCount: 4,
		Features: []string{"layering", "striping", "exclusive-lock"}}
	if fmt.Sprint(info) != fmt.Sprint(want) {
		t.Errorf("rbd info of the image the YAML made: %+v, want %+v", info, want)
	}
	if got := rbdExport(t, c, "rbd/"+name)[:3<<20]; !bytes.Equal(got, bytes.Repeat([]byte{0x71}, 3<<20)) {
		t.Error("rbd export: the striped image does not hold what was written through the export")
	}
	stopDaemon(t, bin, d.stateDir, d.cmd, d.done)

	bad := filepath.Join(t.TempDir(), "bad.yaml")
	os.WriteFile(bad, []byte(fmt.Sprintf("disks:\n  - {name: vm2, format: rbd, image: %q, domain: 0, device: xvdc, create: {size: 8M, object-size: 3M}}\n", spec+"x")), 0o644)
	if out, err := exec.Command(bin, "run", "--dry-run", "-c", bad).CombinedOutput(); err == nil || !strings.Contains(string(out), "want a power of two from 4K to 32M") {
		t.Errorf("a YAML with object-size 3M: %v %s", err, out)
	}
}
