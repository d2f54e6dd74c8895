// Package scripts holds no Go code: its tests run the shell scripts with
// fake package tools on PATH.
package scripts

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// fakeTools makes a PATH holding a logging apt-get (which fails its first
// `install` when failFirst) and a sudo that just runs its arguments, plus the
// few real tools the script uses. Nothing it looks for is found on it.
func fakeTools(t *testing.T, failFirst bool) (path, logFile string) {
	t.Helper()
	dir := t.TempDir()
	logFile = filepath.Join(dir, "apt.log")
	fail := "false"
	if failFirst {
		fail = "true"
	}
	apt := `#!/bin/sh
echo "$*" >>` + logFile + `
if [ "$1" = install ] && ` + fail + ` && [ ! -e ` + dir + `/failed ]; then
  touch ` + dir + `/failed
  echo "E: Failed to fetch http://deb.example/pool/x.deb  404  Not Found" >&2
  exit 100
fi
exit 0
`
	if err := os.WriteFile(filepath.Join(dir, "apt-get"), []byte(apt), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "sudo"), []byte("#!/bin/sh\nexec \"$@\"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tool := range []string{"bash", "id", "ls", "grep", "sh", "touch"} {
		real, err := exec.LookPath(tool)
		if err != nil {
			t.Skipf("%s not found", tool)
		}
		if err := os.Symlink(real, filepath.Join(dir, tool)); err != nil {
			t.Fatal(err)
		}
	}
	return dir, logFile
}

func runInstall(t *testing.T, failFirst bool) []string {
	t.Helper()
	path, logFile := fakeTools(t, failFirst)
	cmd := exec.Command(filepath.Join(path, "bash"), "install-oracles.sh")
	cmd.Env = []string{"PATH=" + path, "HOME=" + t.TempDir()}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("install-oracles.sh: %v\n%s", err, out)
	}
	b, err := os.ReadFile(logFile)
	if err != nil {
		t.Fatal(err)
	}
	var calls []string
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if l != "" {
			calls = append(calls, l)
		}
	}
	return calls
}

// Recommends are left out: they once cost 156 MB.
func TestInstallOraclesNoRecommends(t *testing.T) {
	calls := runInstall(t, false)
	n := 0
	for _, c := range calls {
		if strings.HasPrefix(c, "install ") {
			n++
			if !strings.Contains(c, "--no-install-recommends") {
				t.Errorf("apt-get %s: want --no-install-recommends", c)
			}
			if !strings.Contains(c, " fio") {
				t.Errorf("apt-get %s: fio (missing here) not asked for", c)
			}
		}
	}
	if n != 1 {
		t.Errorf("%d installs, want 1: %q", n, calls)
	}
}

// A failed install (stale lists: 404) is followed by an update and one
// more install.
func TestInstallOraclesRetriesAfterUpdate(t *testing.T) {
	calls := runInstall(t, true)
	var last []string
	for _, c := range calls {
		last = append(last, strings.Fields(c)[0])
	}
	// An update may come first (no lists on a fresh machine).
	got := strings.Join(last, " ")
	got = strings.TrimPrefix(got, "update ")
	if got != "install update install" {
		t.Errorf("apt-get calls %q, want install, update, install", calls)
	}
}
