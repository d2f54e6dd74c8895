package crashfs

import (
	"bytes"
	"errors"
	"os"
	"testing"

	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

func open(t *testing.T, fs *FS, path string) hostfile.File {
	t.Helper()
	f, err := fs.Open(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func TestCrashKeepsSyncedAndChosenPending(t *testing.T) {
	fs := New()
	f := open(t, fs, "/d/a")
	f.WriteAt([]byte("synced"), 0)
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("XX"), 0)   // pending 0
	f.WriteAt([]byte("tail"), 6) // pending 1
	f.Truncate(8)                // pending 2
	// Reads see everything at once.
	got := make([]byte, 8)
	if _, err := f.ReadAt(got, 0); err != nil || string(got) != "XXncedta" {
		t.Fatalf("read before the crash: %q %v", got, err)
	}
	cases := []struct {
		keep []bool
		want string
	}{
		{[]bool{false, false, false}, "synced"},
		{[]bool{true, false, false}, "XXnced"},
		{[]bool{false, true, false}, "syncedtail"},
		{[]bool{false, true, true}, "syncedta"},
		{[]bool{true, true, true}, "XXncedta"},
	}
	for _, c := range cases {
		i := 0
		img := fs.Crash(func() bool { i++; return c.keep[i-1] })
		if string(img["/d/a"]) != c.want {
			t.Errorf("keep %v: %q, want %q", c.keep, img["/d/a"], c.want)
		}
	}
	if _, err := f.WriteAt([]byte("late"), 0); !errors.Is(err, ErrCrashed) {
		t.Fatalf("write after the crash: %v", err)
	}
	if err := f.Sync(); !errors.Is(err, ErrCrashed) {
		t.Fatalf("sync after the crash: %v", err)
	}
	if err := fs.Remove("/d/a"); !errors.Is(err, ErrCrashed) {
		t.Fatalf("remove after the crash: %v", err)
	}
	if _, err := fs.Open("/d/new", os.O_RDWR|os.O_CREATE, 0o644); !errors.Is(err, ErrCrashed) {
		t.Fatalf("create after the crash: %v", err)
	}
	// The rebooted machine sees the crash image as durable.
	after := FromImage(map[string][]byte{"/d/a": []byte("synced")})
	if b := after.ReadFile("/d/a"); string(b) != "synced" {
		t.Fatalf("after reboot: %q", b)
	}
}

func TestScheduleCountsOnlyChosenKinds(t *testing.T) {
	fs := New()
	f := open(t, fs, "/a")
	fs.Schedule(2, Syncs)
	for i := range 5 {
		if _, err := f.WriteAt([]byte{byte(i)}, int64(i)); err != nil {
			t.Fatalf("write %d under a sync-only schedule: %v", i, err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("first sync: %v", err)
	}
	f.WriteAt([]byte{9}, 9)
	if err := f.Sync(); !errors.Is(err, ErrCrashed) {
		t.Fatalf("second sync: %v, want the crash", err)
	}
	if !fs.Crashed() || fs.Syncs() != 1 {
		t.Fatalf("crashed %v after %d syncs", fs.Crashed(), fs.Syncs())
	}
	img := fs.Crash(func() bool { return false })
	if !bytes.Equal(img["/a"], []byte{0, 1, 2, 3, 4}) {
		t.Fatalf("the crashing sync made its writes durable: %v", img["/a"])
	}

	fs = New()
	f = open(t, fs, "/a")
	fs.Schedule(3, Writes|Truncates)
	f.WriteAt([]byte{1}, 0)
	f.Sync()
	f.Truncate(10)
	if _, err := f.WriteAt([]byte{1}, 0); !errors.Is(err, ErrCrashed) {
		t.Fatalf("third write or truncate: %v, want the crash", err)
	}
}

func TestFailWritesAndModes(t *testing.T) {
	fs := New()
	f := open(t, fs, "/a")
	boom := errors.New("boom")
	fs.FailWrites(func(nth int) error {
		if nth == 2 {
			return boom
		}
		return nil
	})
	f.WriteAt([]byte{1}, 0)
	if _, err := f.WriteAt([]byte{2}, 1); !errors.Is(err, boom) {
		t.Fatalf("second write: %v", err)
	}
	if _, err := f.WriteAt([]byte{3}, 2); err != nil || fs.Writes() != 3 {
		t.Fatalf("third write: %v (%d writes)", err, fs.Writes())
	}
	if fs.Crashed() {
		t.Fatal("an injected error crashed the file system")
	}
	if b := fs.ReadFile("/a"); !bytes.Equal(b, []byte{1, 0, 3}) {
		t.Fatalf("contents %v", b)
	}

	if _, err := fs.Open("/a", os.O_RDWR|os.O_CREATE|os.O_EXCL, 0); !errors.Is(err, os.ErrExist) {
		t.Fatalf("exclusive create of an existing file: %v", err)
	}
	if _, err := fs.Open("/missing", os.O_RDONLY, 0); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("open of a missing file: %v", err)
	}
	ro, _ := fs.Open("/a", os.O_RDONLY, 0)
	if _, err := ro.WriteAt([]byte{1}, 0); !errors.Is(err, os.ErrPermission) {
		t.Fatalf("write through a read-only open: %v", err)
	}
	if _, err := fs.OpenIn("/d", "../a", os.O_RDONLY, 0, true); !errors.Is(err, hostfile.ErrEscape) {
		t.Fatalf("confined open of ../a: %v", err)
	}
	if g, err := fs.OpenIn("/", "a", os.O_RDONLY, 0, true); err != nil || g == nil {
		t.Fatalf("confined open of a: %v", err)
	}
	// A punch zeroes inside the file only and keeps the size.
	f.PunchHole(1, 100)
	if n, _ := f.Size(); n != 3 || !bytes.Equal(fs.ReadFile("/a"), []byte{1, 0, 0}) {
		t.Fatalf("after punch: size %d, %v", n, fs.ReadFile("/a"))
	}
}
