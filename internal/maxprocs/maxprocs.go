// Package maxprocs sets the Go runtime's number of Ps for the daemon and
// the workers, processes that spend their time in system calls.
package maxprocs

import (
	"os"
	"runtime"
)

// AtLeastTwo gives the runtime two Ps on a one-CPU host (a dom0 with one
// vCPU), unless GOMAXPROCS is set; it returns the number in force.
//
// With one P, every system call that outlasts a sysmon tick (20 us) loses
// its P: the rule that spares a short call needs an idle P, and there is
// none. Each such retake sets sysmon back to waking every 20 us for
// another 50 rounds. Under the harness's TCG Xen, where a 1 MiB pwrite or
// grant copy lasts milliseconds, a ring worker switched context about 230
// times per 1 MiB request, against about 45 for QEMU's xen-block
// (docs/PERFORMANCE.md). With a second P, idle, a call is left alone for
// 10 ms, and the extra P costs nothing while no goroutine runs on it.
func AtLeastTwo() int {
	if os.Getenv("GOMAXPROCS") == "" && runtime.GOMAXPROCS(0) < 2 {
		runtime.GOMAXPROCS(2)
	}
	return runtime.GOMAXPROCS(0)
}
