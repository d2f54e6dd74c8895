//go:build rbd

package rbd

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/internal/cephdev"
)

// TestLockAndDiffAsRBDSeesThem: `rbd lock ls` shows a writer's lock, and
// `rbd diff --whole-object` (the object map, as our Map reads it) reports
// exactly the runs our Map calls data.
func TestLockAndDiffAsRBDSeesThem(t *testing.T) {
	c, name, spec := newImage(t, 64<<20)
	im, err := Open(spec, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if locks := c.RBD(t, "lock", "ls", "rbd/"+name); !strings.Contains(locks, "exclusive lock") {
		t.Errorf("rbd lock ls shows no exclusive lock while we write:\n%s", locks)
	}
	for _, off := range []int64{0, 5 << 20, 33<<20 + 4096, 64<<20 - 4096} {
		if _, err := im.WriteAt(bytes.Repeat([]byte{9}, 4096), off); err != nil {
			t.Fatal(err)
		}
	}
	ext, err := im.Map(0, im.Size())
	if err != nil {
		t.Fatal(err)
	}
	var ours [][2]int64
	for _, e := range ext {
		if e.Kind == image.Data {
			ours = append(ours, [2]int64{e.Offset, e.Length})
		}
	}
	var diff []struct {
		Offset int64  `json:"offset"`
		Length int64  `json:"length"`
		Exists string `json:"exists"`
	}
	if err := json.Unmarshal([]byte(c.RBD(t, "diff", "--whole-object", "--format", "json", "rbd/"+name)), &diff); err != nil {
		t.Fatal(err)
	}
	var theirs [][2]int64
	for _, d := range diff {
		if d.Exists != "true" {
			continue
		}
		if n := len(theirs); n > 0 && theirs[n-1][0]+theirs[n-1][1] == d.Offset {
			theirs[n-1][1] += d.Length
		} else {
			theirs = append(theirs, [2]int64{d.Offset, d.Length})
		}
	}
	if len(ours) == 0 || !slices.Equal(ours, theirs) {
		t.Errorf("our map %v, rbd diff %v", ours, theirs)
	}
}

// TestBadSources: each mistake fails with a clear error within a bound,
// never a hang.
func TestBadSources(t *testing.T) {
	c := cephdev.Get(t)
	name, spec := c.Name(t)
	badKeyring := t.TempDir() + "/keyring"
	os.WriteFile(badKeyring, []byte("[client.admin]\n\tkey = AQBtbm9uZW5vbmVub25lbm9uZW5vbmVubw==\n"), 0o600)
	cases := []struct {
		name, spec string
		want       string
		within     time.Duration
	}{
		{"missing image", spec, `no image "` + name + `" in pool "rbd"`, 20 * time.Second},
		{"missing pool", strings.Replace(spec, "rbd/", "nopool/", 1), `open pool "nopool"`, 20 * time.Second},
		{"wrong keyring", spec + ":keyring=" + badKeyring, "check id= and keyring=", 40 * time.Second},
		{"unreachable monitor", spec + ":mon_host=127.0.0.1\\:9", "no monitor answered", 40 * time.Second},
		{"missing conf", "rbd/x:conf=/nonexistent/ceph.conf", "read ceph config", 5 * time.Second},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			im, err := Open(tc.spec, Options{})
			took := time.Since(start)
			if err == nil {
				im.Close()
				t.Fatal("opened")
			}
			if !strings.Contains(err.Error(), tc.want) || took > tc.within {
				t.Fatalf("after %v: %v; want %q within %v", took.Round(time.Millisecond), err, tc.want, tc.within)
			}
			if tc.name == "missing image" && !errors.Is(err, os.ErrNotExist) {
				t.Errorf("a missing image is not ErrNotExist: %v", err)
			}
			t.Logf("%v: %v", took.Round(time.Millisecond), err)
		})
	}
}

// TestClusterStallsMidIO: with the OSD stopped, a write fails after the
// op timeout instead of hanging; the image stays open, and once the OSD
// is back the same Image reads and writes again.
func TestClusterStallsMidIO(t *testing.T) {
	c, _, spec := newImage(t, 4<<20)
	osd := c.OSDPid(t)
	im, err := Open(spec+":rados_osd_op_timeout=3", Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if err := syscall.Kill(osd, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := true
	defer func() {
		if stopped {
			syscall.Kill(osd, syscall.SIGCONT)
		}
	}()
	start := time.Now()
	_, err = im.WriteAt(bytes.Repeat([]byte{1}, 4096), 0)
	took := time.Since(start)
	if err == nil || took > 30*time.Second {
		t.Fatalf("write to a stopped OSD: %v after %v", err, took)
	}
	t.Logf("write to a stopped OSD failed after %v: %v", took.Round(100*time.Millisecond), err)
	syscall.Kill(osd, syscall.SIGCONT)
	stopped = false
	buf := bytes.Repeat([]byte{2}, 4096)
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err = im.WriteAt(buf, 0); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("I/O did not resume after the OSD came back: %v", err)
		}
		time.Sleep(time.Second)
	}
	got := make([]byte, 4096)
	if _, err := im.ReadAt(got, 0); err != nil || !bytes.Equal(got, buf) {
		t.Fatalf("read after the OSD came back: %v", err)
	}
}
