// Package cephdev starts the throwaway single-node Ceph cluster of
// scripts/ceph-dev.sh for a test binary, once, and stops it when the
// binary ends. BLKTAP_CEPH_CONF names a running cluster's conf file
// instead (a developer's, kept between runs).
//
// Without the Ceph packages the tests that need a cluster skip, saying
// what to install; under CI (CI=true) they fail instead, as every
// missing oracle does.
package cephdev

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/blktap-go/blktap/internal/oracle"
)

// Cluster is a running cluster.
type Cluster struct {
	Conf string // its ceph.conf, with the admin keyring
	dir  string // "" for a cluster this package did not start
}

var (
	once    sync.Once
	cluster *Cluster
	failure string
)

// programs the script needs.
var programs = []string{"ceph-mon", "ceph-osd", "ceph", "rbd", "monmaptool", "ceph-authtool"}

// Get returns the cluster, starting it on first use; it skips (or, under
// CI, fails) t when the cluster cannot run here.
func Get(t testing.TB) *Cluster {
	t.Helper()
	once.Do(start)
	if cluster == nil {
		if oracle.InCI() {
			t.Fatalf("ceph cluster: %s", failure)
		}
		t.Skipf("ceph cluster: %s", failure)
	}
	return cluster
}

func start() {
	if conf := os.Getenv("BLKTAP_CEPH_CONF"); conf != "" {
		cluster = &Cluster{Conf: conf}
		return
	}
	for _, p := range programs {
		if _, err := exec.LookPath(p); err != nil {
			failure = fmt.Sprintf("%s is not installed (apt-get install --no-install-recommends ceph-mon ceph-osd ceph-common, or make oracles)", p)
			return
		}
	}
	_, file, _, _ := runtime.Caller(0)
	script := filepath.Join(filepath.Dir(file), "..", "..", "scripts", "ceph-dev.sh")
	dir, err := os.MkdirTemp("", "blktap-ceph-")
	if err != nil {
		failure = err.Error()
		return
	}
	port, err := freePort()
	if err != nil {
		failure = err.Error()
		return
	}
	cmd := exec.Command(script, "start", dir)
	cmd.Env = append(os.Environ(), "CEPH_DEV_PORT="+strconv.Itoa(port), "CEPH_DEV_BYTES=536870912")
	out, err := cmd.CombinedOutput()
	if err != nil {
		exec.Command(script, "stop", dir).Run()
		failure = fmt.Sprintf("%s start: %v\n%s", script, err, out)
		return
	}
	// The start time and the cluster's memory, for the test log.
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, "ceph-dev:") {
			fmt.Fprintln(os.Stderr, line)
		}
	}
	cluster = &Cluster{Conf: filepath.Join(dir, "ceph.conf"), dir: dir}
	stopScript = script
}

var stopScript string

// Stop stops a cluster that Get started; call it from TestMain after
// m.Run.
func Stop() {
	if cluster != nil && cluster.dir != "" {
		exec.Command(stopScript, "stop", cluster.dir).Run()
	}
}

// freePort finds a TCP port on loopback that nothing listens on now.
func freePort() (int, error) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// OSDPid is the process id of the cluster's OSD (the clusters that
// scripts/ceph-dev.sh starts keep pid files beside their conf file).
func (c *Cluster) OSDPid(t testing.TB) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(filepath.Dir(c.Conf), "osd.0.pid"))
	if err != nil {
		t.Skipf("no OSD pid file beside %s: %v", c.Conf, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// RBD runs the rbd tool against the cluster and returns its standard
// output (its warnings on standard error stay out of JSON).
func (c *Cluster) RBD(t testing.TB, args ...string) string {
	t.Helper()
	return c.run(t, "rbd", args...)
}

// Ceph runs the ceph tool against the cluster and returns its output,
// failing t if it fails.
func (c *Cluster) Ceph(t testing.TB, args ...string) string {
	t.Helper()
	return c.run(t, "ceph", args...)
}

func (c *Cluster) run(t testing.TB, tool string, args ...string) string {
	t.Helper()
	var stderr strings.Builder
	cmd := exec.Command(tool, append([]string{"-c", c.Conf}, args...)...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s%s", tool, strings.Join(args, " "), err, out, stderr.String())
	}
	return string(out)
}

// Name makes a unique image name for t in pool rbd, and the spec string
// (ParseSpec's form) that reaches it through this cluster.
func (c *Cluster) Name(t testing.TB) (image, spec string) {
	image = fmt.Sprintf("t%d-%s", os.Getpid(), strings.NewReplacer("/", "-", " ", "-").Replace(t.Name()))
	return image, "rbd/" + image + ":conf=" + c.Conf
}
