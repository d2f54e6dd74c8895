package xen

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

// TestSysDeviceOnOtherFDs runs the real device's code paths on
// descriptors that are not Xen's: ioctls fail with the kernel's ENOTTY
// (wrapped, no panic), and the evtchn read/unmask framing works on a pipe,
// which carries bytes as the evtchn fd does.
func TestSysDeviceOnOtherFDs(t *testing.T) {
	null, err := unix.Open("/dev/null", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[1])
	d := &sysDevice{gnt: null, evt: p[0]}

	if _, err := d.MapGrants(1, []uint32{8}, true); !errors.Is(err, unix.ENOTTY) {
		t.Errorf("MapGrants on /dev/null: %v", err)
	}
	if _, err := d.MapGrants(1, nil, true); !errors.Is(err, ErrBadOptions) {
		t.Errorf("MapGrants of no refs: %v", err)
	}
	if _, err := d.MapGrants(1, make([]uint32, maxMapRefs+1), true); !errors.Is(err, ErrBadOptions) {
		t.Errorf("MapGrants of too many refs: %v", err)
	}
	if _, err := d.BindInterdomain(1, 2); !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOTTY) {
		t.Errorf("BindInterdomain on a pipe: %v", err)
	}
	if err := d.Notify(3); err == nil {
		t.Error("Notify on a pipe succeeded")
	}

	var ports [8]uint32
	if n, err := d.ReadPorts(ports[:]); n != 0 || err != nil {
		t.Fatalf("empty: %d %v", n, err)
	}
	unix.Write(p[1], append(encodePort(9), encodePort(1234)...))
	if n, err := d.ReadPorts(ports[:]); n != 2 || err != nil || ports[0] != 9 || ports[1] != 1234 {
		t.Fatalf("ReadPorts = %d %v %v", n, ports[:2], err)
	}
	// Unmask writes the port back, as a u32.
	var q [2]int
	if err := unix.Pipe2(q[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(q[0])
	d2 := &sysDevice{gnt: -1, evt: q[1]}
	if err := d2.Unmask(77); err != nil {
		t.Fatal(err)
	}
	var b [8]byte
	if n, _ := unix.Read(q[0], b[:]); n != 4 || ne.Uint32(b[:]) != 77 {
		t.Fatalf("unmask wrote % x", b[:n])
	}
	if _, err := d2.MapGrants(1, []uint32{1}, false); !errors.Is(err, ErrClosed) {
		t.Errorf("MapGrants without gntdev: %v", err)
	}

	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := d.ReadPorts(ports[:]); !errors.Is(err, ErrClosed) {
		t.Errorf("ReadPorts after Close: %v", err)
	}
	if err := d.Notify(1); !errors.Is(err, ErrClosed) {
		t.Errorf("Notify after Close: %v", err)
	}
}
