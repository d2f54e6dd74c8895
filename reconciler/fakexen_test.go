package reconciler

import (
	"os"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/worker"
	"github.com/blktap-go/blktap/tapengine/xen"
)

// Environment the daemon harness hands its workers (the test binary, run
// as `__worker`): workers inherit the test process's environment.
const (
	// envStubXen=1: rings over the "xen" transport map stubXen's pages.
	envStubXen = "BLKTAP_TEST_STUB_XEN"
	// envWorkerDelay=NAME=DURATION[,...]: the worker of disk NAME waits
	// DURATION before it answers its daemon (a slow image open).
	envWorkerDelay = "BLKTAP_TEST_WORKER_DELAY"
)

// harnessWorker prepares a worker started by a daemon under test, before
// worker.Main runs.
func harnessWorker(args []string) {
	if os.Getenv(envStubXen) == "1" {
		worker.OpenXen = func() (xen.Device, error) { return newStubXen() }
	}
	name := ""
	if i := slices.Index(args, "--name"); i >= 0 && i+1 < len(args) {
		name = args[i+1]
	}
	for _, e := range strings.Split(os.Getenv(envWorkerDelay), ",") {
		if n, dur, ok := strings.Cut(e, "="); ok && n == name {
			if d, err := time.ParseDuration(dur); err == nil {
				time.Sleep(d)
			}
		}
	}
}

// stubXen plays the hypervisor for a worker on a machine without Xen:
// every grant maps a zeroed page and the event channel is an eventfd no
// one signals, so the worker serves a ring whose guest never sends a
// request. That is all the daemon's handshake needs, and what the
// harness checks; the I/O path over a Xen ring is tested in tapengine/xen.
type stubXen struct {
	efd  int
	port uint32
}

func newStubXen() (*stubXen, error) {
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, err
	}
	return &stubXen{efd: efd}, nil
}

func (s *stubXen) MapGrants(domid uint32, refs []uint32, writable bool) (xen.Mapping, error) {
	mem, err := unix.Mmap(-1, 0, len(refs)*blkif.PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	if err != nil {
		return xen.Mapping{}, err
	}
	return xen.Mapping{Mem: mem}, nil
}

func (s *stubXen) Unmap(m xen.Mapping) error { return unix.Munmap(m.Mem) }

func (s *stubXen) BindInterdomain(domid, remotePort uint32) (uint32, error) {
	s.port++
	return s.port, nil
}

func (s *stubXen) Unbind(uint32) error                   { return nil }
func (s *stubXen) Notify(uint32) error                   { return nil }
func (s *stubXen) EventFD() int                          { return s.efd }
func (s *stubXen) ReadPorts(ports []uint32) (int, error) { return 0, nil }
func (s *stubXen) Unmask(uint32) error                   { return nil }
func (s *stubXen) Close() error                          { return unix.Close(s.efd) }
