// Package oracle finds the real programs (written by others) that tests
// check the project against. Under CI (CI=true) a missing oracle fails the
// test; elsewhere it skips with the package to install.
package oracle

import (
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// packages names the Debian package that ships each oracle.
var packages = map[string]string{
	"qemu-img":         "qemu-utils",
	"qemu-io":          "qemu-utils",
	"qemu-nbd":         "qemu-utils",
	"qemu-system-i386": "qemu-system-x86",
	"nbdinfo":          "libnbd-bin",
	"nbdcopy":          "libnbd-bin",
	"nbdsh":            "libnbd-bin",
	"nbdkit":           "nbdkit",
	"fio":              "fio",
	"xenstore-read":    "xenstore-utils",
	"xenstore-write":   "xenstore-utils",
	"xenstore-ls":      "xenstore-utils",
	"xenstore-rm":      "xenstore-utils",
	"xenstore-list":    "xenstore-utils",
	"xenstore-watch":   "xenstore-utils",
	"xenstore-chmod":   "xenstore-utils",
	"qcowinfo":         "libqcow-utils",
	"vhdiinfo":         "libvhdi-utils",
	"vhdimount":        "libvhdi-utils",
	"vmdkinfo":         "libvmdk-utils",
	"gcc":              "gcc",
	"promtool":         "prometheus",
	"zsh":              "zsh",
	"fish":             "fish",
}

// InCI reports whether the tests run under CI, where oracles are mandatory.
func InCI() bool { return os.Getenv("CI") == "true" }

// Require returns the path of program, or ends the test: Fatal under CI,
// Skip elsewhere.
func Require(t testing.TB, program string) string {
	t.Helper()
	p, err := exec.LookPath(program)
	if err == nil {
		return p
	}
	// Some oracles live outside PATH (Xen's tools).
	if _, err := os.Stat(program); err == nil {
		return program
	}
	pkg := packages[program]
	if pkg == "" {
		pkg = "?"
	}
	if InCI() {
		t.Fatalf("oracle %s missing (apt-get install %s): required under CI", program, pkg)
	}
	t.Skipf("oracle %s missing (apt-get install %s)", program, pkg)
	return ""
}

// Run runs program (found as Require finds it) with args and returns
// its combined output; a failure to start or a non-zero exit fails t,
// with the command line and the output.
func Run(t testing.TB, program string, args ...string) string {
	t.Helper()
	out, err := exec.Command(Require(t, program), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", program, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// WaitListening waits until a server accepts connections on the Unix
// socket path, failing t after within. The socket file appears at bind,
// before listen, so its existence alone lets a client be refused.
func WaitListening(t testing.TB, path string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		c, err := net.Dial("unix", path)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing accepts connections on %s after %v: %v", path, within, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// RequireURing ends the test when io_uring is unavailable (err, from
// raw.URingSupported): Skip, or Fatal under CI unless the runner declares
// io_uring off by design (BLKTAP_NO_URING=1), so the uring path cannot go
// untested without anyone saying so.
func RequireURing(t testing.TB, err error) {
	t.Helper()
	if err == nil {
		return
	}
	if InCI() && os.Getenv("BLKTAP_NO_URING") == "" {
		t.Fatalf("io_uring unavailable under CI (set BLKTAP_NO_URING=1 where it is off by design): %v", err)
	}
	t.Skipf("io_uring unavailable: %v", err)
}
