package frontend

import (
	"context"
	"encoding/json"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/internal/oracle"
	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/nbd"
	"github.com/blktap-go/blktap/tapengine/ring"
)

// serveNBD exports the frontend's guest view over NBD on a unix socket,
// as the daemon does, and returns the URI.
func serveNBD(t *testing.T, f *Frontend) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "guest.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	// RoundTrip, as the daemon sets it: reads and writes take the
	// started (nbd.AsyncBackend) path.
	srv := &nbd.Server{Export: nbd.Export{Name: "guest", Backend: f, RoundTrip: true}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		srv.Close()
		<-done
	})
	return "nbd+unix:///guest?socket=" + sock
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out := oracle.Run(t, name, args...)
	if strings.Contains(out, "verification failed") || strings.Contains(string(out), "verify: bad") {
		t.Fatalf("%s %s: verification failed\n%s", name, strings.Join(args, " "), out)
	}
	return string(out)
}

// TestOracles drives the ring path with programs no one here wrote:
// qemu-io writes and verifies patterns through NBD -> frontend -> ring ->
// Serve -> file, the file read directly must hold them, nbdinfo must see
// the size, and qemu-img compare must find the export equal to the file.
func TestOracles(t *testing.T) {
	qemuIO := oracle.Require(t, "qemu-io")
	nbdinfo := oracle.Require(t, "nbdinfo")
	qemuImg := oracle.Require(t, "qemu-img")
	fio := oracle.Require(t, "fio")
	const size = 16 << 20
	for _, c := range []struct {
		name  string
		fopts Options
		ropts ring.Options
	}{
		{"x86_32", Options{Protocol: blkif.X86_32}, ring.Options{}},
		{"x86_64-order2-indirect", Options{Protocol: blkif.X86_64, RingOrder: 2, MaxIndirectSegments: 256}, ring.Options{MaxIndirectSegments: 256, Discard: true}},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := newRigOpts(t, c.fopts, size, c.ropts)
			uri := serveNBD(t, r.f)
			run(t, qemuIO, "-f", "raw", "-c", "write -P 0xa5 1M 4M", "-c", "write -P 0x3c 7M 4097", "-c", "flush", uri)
			run(t, qemuIO, "-f", "raw", "-c", "read -P 0xa5 1M 4M", "-c", "read -P 0x3c 7M 4097", "-c", "read -P 0 0 1M", uri)
			// TRIM and WRITE_ZEROES: real discards with feature-discard,
			// zero writes without; either way they read back as zeros.
			run(t, qemuIO, "-f", "raw", "-c", "discard 2M 1M", "-c", "write -z 4M 64k", "-c", "write -z -u 4224k 64k", uri)
			run(t, qemuIO, "-f", "raw", "-c", "read -P 0xa5 1M 1M", "-c", "read -P 0 2M 1M", "-c", "read -P 0xa5 3M 1M",
				"-c", "read -P 0 4M 64k", "-c", "read -P 0xa5 4160k 64k", "-c", "read -P 0 4224k 64k", uri)
			if c.ropts.Discard && r.stats.Discards.Load() == 0 {
				t.Error("no discard reached the ring")
			}
			run(t, qemuIO, "-f", "raw", "-c", "write -P 0xa5 2M 1M", "-c", "write -P 0xa5 4M 256k", uri)
			// Straight from the file: qemu-io on the raw image.
			run(t, qemuIO, "-f", "raw", "-r", "-c", "read -P 0xa5 1M 4M", "-c", "read -P 0x3c 7M 4097", r.img.f.Name())
			var info struct {
				Exports []struct {
					Size int64 `json:"export-size"`
				} `json:"exports"`
			}
			if err := json.Unmarshal([]byte(run(t, nbdinfo, "--json", uri)), &info); err != nil {
				t.Fatal(err)
			}
			if len(info.Exports) != 1 || info.Exports[0].Size != size {
				t.Errorf("nbdinfo: %+v, want size %d", info, size)
			}
			run(t, qemuImg, "compare", "-f", "raw", "-F", "raw", uri, r.img.f.Name())
			// fio: random 4k writes at queue depth 16 through the ring, then
			// a crc32c verify pass reading every block back.
			run(t, fio, "--name=ring", "--ioengine=nbd", "--uri="+uri, "--rw=randwrite", "--bs=4k",
				"--iodepth=16", "--size=8M", "--offset=8M", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--output-format=terse")
			run(t, qemuImg, "compare", "-f", "raw", "-F", "raw", uri, r.img.f.Name())
			if r.stats.Errors.Load() != 0 {
				t.Errorf("%d error responses", r.stats.Errors.Load())
			}
			if c.ropts.MaxIndirectSegments > 0 && r.stats.Indirects.Load() == 0 {
				t.Error("no indirect requests")
			}
		})
	}
}
