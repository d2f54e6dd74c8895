package nbd

import (
	"bytes"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/internal/oracle"
)

// server is a real NBD server process started by a test.
type server struct {
	t      testing.TB
	args   []string
	sock   string
	cmd    *exec.Cmd
	exited chan struct{}
}

// startServer runs argv (which must listen on sock) and waits until the
// socket accepts connections.
func startServer(t testing.TB, sock string, argv ...string) *server {
	t.Helper()
	s := &server{t: t, args: argv, sock: sock}
	s.start()
	t.Cleanup(s.stop)
	return s
}

func (s *server) start() {
	s.t.Helper()
	os.Remove(s.sock)
	cmd := exec.Command(s.args[0], s.args[1:]...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("start %v: %v", s.args, err)
	}
	s.cmd = cmd
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	// A readiness probe, not a timing assertion: the bound only stops a
	// server that never comes up from hanging the test.
	for i := 0; ; i++ {
		if c, err := net.Dial("unix", s.sock); err == nil {
			c.Close()
			break
		}
		select {
		case <-exited:
			s.t.Fatalf("%v exited: %s", s.args, stderr.String())
		case <-time.After(10 * time.Millisecond):
		}
		if i > 1000 {
			s.t.Fatalf("%v: socket %s never accepted", s.args, s.sock)
		}
	}
	s.exited = exited
}

// kill ends the server abruptly (SIGKILL), as a crash would.
func (s *server) kill() {
	if s.cmd != nil && s.cmd.Process != nil {
		s.cmd.Process.Kill()
		<-s.exited
		s.cmd = nil
	}
}

func (s *server) stop() { s.kill() }

func (s *server) uri(export string) string {
	return "nbd:" + URI{Network: "unix", Address: s.sock, Export: export}.String()
}

func sockPath(t testing.TB, name string) string {
	return filepath.Join(t.TempDir(), name)
}

func qemuNBD(t testing.TB, file string) *server {
	qn := oracle.Require(t, "qemu-nbd")
	sock := sockPath(t, "qemu-nbd.sock")
	return startServer(t, sock, qn, "-f", "raw", "--persistent", "-k", sock, file)
}

func nbdkit(t testing.TB, args ...string) *server {
	nk := oracle.Require(t, "nbdkit")
	sock := sockPath(t, "nbdkit.sock")
	argv := append([]string{nk, "-f", "--exit-with-parent", "-U", sock}, args...)
	return startServer(t, sock, argv...)
}

func mustOpen(t testing.TB, uri string, opts Options) *Image {
	t.Helper()
	img, err := Open(uri, opts)
	if err != nil {
		t.Fatalf("Open(%s): %v", uri, err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

func isEIO(err error) bool { return errors.Is(err, unix.EIO) }
