package xen

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/internal/oracle"
)

// abiProbe prints, from the installed uapi headers (linux-libc-dev's
// /usr/include/xen/{gntdev,evtchn}.h, and libxen-dev's grant_table.h for
// the grant copy flags), every number and layout abi.go
// hard-codes, one "name value" per line.
const abiProbe = `#include <stdio.h>
#include <stddef.h>
#include <linux/types.h>
#include <sys/ioctl.h>
/* The uapi headers use Xen's grant_ref_t and domid_t without defining
   them (Xen's own public headers do). */
typedef __u32 grant_ref_t;
typedef __u16 domid_t;
#include <xen/gntdev.h>
#include <xen/evtchn.h>
/* GNTCOPY_* are Xen's own (libxen-dev), not in the uapi headers. */
#include <stdint.h>
#include <xen/grant_table.h>
#define P(name, v) printf("%s %llu\n", name, (unsigned long long)(v))
int main(void) {
	P("IOCTL_GNTDEV_MAP_GRANT_REF", IOCTL_GNTDEV_MAP_GRANT_REF);
	P("IOCTL_GNTDEV_UNMAP_GRANT_REF", IOCTL_GNTDEV_UNMAP_GRANT_REF);
	P("IOCTL_GNTDEV_SET_UNMAP_NOTIFY", IOCTL_GNTDEV_SET_UNMAP_NOTIFY);
	P("IOCTL_EVTCHN_BIND_INTERDOMAIN", IOCTL_EVTCHN_BIND_INTERDOMAIN);
	P("IOCTL_EVTCHN_UNBIND", IOCTL_EVTCHN_UNBIND);
	P("IOCTL_EVTCHN_NOTIFY", IOCTL_EVTCHN_NOTIFY);
	P("sizeof grant_ref", sizeof(struct ioctl_gntdev_grant_ref));
	P("sizeof map_grant_ref", sizeof(struct ioctl_gntdev_map_grant_ref));
	P("offsetof map.count", offsetof(struct ioctl_gntdev_map_grant_ref, count));
	P("offsetof map.index", offsetof(struct ioctl_gntdev_map_grant_ref, index));
	P("offsetof map.refs", offsetof(struct ioctl_gntdev_map_grant_ref, refs));
	P("offsetof grant_ref.ref", offsetof(struct ioctl_gntdev_grant_ref, ref));
	P("sizeof unmap_grant_ref", sizeof(struct ioctl_gntdev_unmap_grant_ref));
	P("offsetof unmap.index", offsetof(struct ioctl_gntdev_unmap_grant_ref, index));
	P("offsetof unmap.count", offsetof(struct ioctl_gntdev_unmap_grant_ref, count));
	P("sizeof unmap_notify", sizeof(struct ioctl_gntdev_unmap_notify));
	P("sizeof bind_interdomain", sizeof(struct ioctl_evtchn_bind_interdomain));
	P("offsetof bind.remote_port", offsetof(struct ioctl_evtchn_bind_interdomain, remote_port));
	P("sizeof unbind", sizeof(struct ioctl_evtchn_unbind));
	P("sizeof notify", sizeof(struct ioctl_evtchn_notify));
	P("IOCTL_GNTDEV_GRANT_COPY", IOCTL_GNTDEV_GRANT_COPY);
	P("sizeof grant_copy", sizeof(struct ioctl_gntdev_grant_copy));
	P("offsetof copy.count", offsetof(struct ioctl_gntdev_grant_copy, count));
	P("offsetof copy.segments", offsetof(struct ioctl_gntdev_grant_copy, segments));
	P("sizeof copy_segment", sizeof(struct gntdev_grant_copy_segment));
	P("offsetof seg.source", offsetof(struct gntdev_grant_copy_segment, source));
	P("offsetof seg.dest", offsetof(struct gntdev_grant_copy_segment, dest));
	P("offsetof seg.source.ref", offsetof(struct gntdev_grant_copy_segment, source.foreign.ref));
	P("offsetof seg.source.offset", offsetof(struct gntdev_grant_copy_segment, source.foreign.offset));
	P("offsetof seg.source.domid", offsetof(struct gntdev_grant_copy_segment, source.foreign.domid));
	P("offsetof seg.len", offsetof(struct gntdev_grant_copy_segment, len));
	P("offsetof seg.flags", offsetof(struct gntdev_grant_copy_segment, flags));
	P("offsetof seg.status", offsetof(struct gntdev_grant_copy_segment, status));
	P("GNTCOPY_source_gref", GNTCOPY_source_gref);
	P("GNTCOPY_dest_gref", GNTCOPY_dest_gref);
	return 0;
}
`

// TestABIAgainstHeaders compiles abiProbe with gcc and compares each value
// with ours, so a wrong ioctl number cannot reach a real dom0.
func TestABIAgainstHeaders(t *testing.T) {
	gcc := oracle.Require(t, "gcc")
	for _, h := range []string{"/usr/include/xen/gntdev.h", "/usr/include/xen/evtchn.h", "/usr/include/xen/grant_table.h"} {
		if _, err := os.Stat(h); err != nil {
			if oracle.InCI() {
				t.Fatalf("%s missing (apt-get install linux-libc-dev libxen-dev)", h)
			}
			t.Skipf("%s missing (apt-get install linux-libc-dev libxen-dev)", h)
		}
	}
	dir := t.TempDir()
	src, bin := filepath.Join(dir, "probe.c"), filepath.Join(dir, "probe")
	if err := os.WriteFile(src, []byte(abiProbe), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(gcc, "-o", bin, src).CombinedOutput(); err != nil {
		t.Fatalf("gcc: %v\n%s", err, out)
	}
	out, err := exec.Command(bin).Output()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]uint64{
		"IOCTL_GNTDEV_MAP_GRANT_REF":    uint64(ioctlGntdevMapGrantRef),
		"IOCTL_GNTDEV_UNMAP_GRANT_REF":  uint64(ioctlGntdevUnmapGrantRef),
		"IOCTL_GNTDEV_SET_UNMAP_NOTIFY": uint64(ioctlGntdevSetUnmapNotify),
		"IOCTL_EVTCHN_BIND_INTERDOMAIN": uint64(ioctlEvtchnBindInterdomain),
		"IOCTL_EVTCHN_UNBIND":           uint64(ioctlEvtchnUnbind),
		"IOCTL_EVTCHN_NOTIFY":           uint64(ioctlEvtchnNotify),
		"sizeof grant_ref":              sizeGntdevGrantRef,
		"sizeof map_grant_ref":          sizeGntdevMapGrantRef,
		"offsetof map.count":            offMapCount,
		"offsetof map.index":            offMapIndex,
		"offsetof map.refs":             offMapRefs,
		"offsetof grant_ref.ref":        4,
		"sizeof unmap_grant_ref":        sizeGntdevUnmapGrant,
		"offsetof unmap.index":          offUnmapIndex,
		"offsetof unmap.count":          offUnmapCount,
		"sizeof unmap_notify":           sizeGntdevUnmapNotify,
		"sizeof bind_interdomain":       sizeEvtchnBindInterdom,
		"offsetof bind.remote_port":     4,
		"sizeof unbind":                 sizeEvtchnPort,
		"sizeof notify":                 sizeEvtchnPort,
		"IOCTL_GNTDEV_GRANT_COPY":       uint64(ioctlGntdevGrantCopy),
		"sizeof grant_copy":             sizeGrantCopy,
		"offsetof copy.count":           offCopyCount,
		"offsetof copy.segments":        offCopySegs,
		"sizeof copy_segment":           sizeGrantCopySeg,
		"offsetof seg.source":           offCopySource,
		"offsetof seg.dest":             offCopyDest,
		"offsetof seg.source.ref":       offCopySource,
		"offsetof seg.source.offset":    offCopySource + 4,
		"offsetof seg.source.domid":     offCopySource + 6,
		"offsetof seg.len":              offCopyLen,
		"offsetof seg.flags":            offCopyFlags,
		"offsetof seg.status":           offCopyStatus,
		"GNTCOPY_source_gref":           gntcopySourceGref,
		"GNTCOPY_dest_gref":             gntcopyDestGref,
	}
	got := map[string]uint64{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		i := strings.LastIndexByte(sc.Text(), ' ')
		v, err := strconv.ParseUint(sc.Text()[i+1:], 10, 64)
		if i < 0 || err != nil {
			t.Fatalf("bad probe line %q", sc.Text())
		}
		got[sc.Text()[:i]] = v
	}
	for name, w := range want {
		g, ok := got[name]
		if !ok {
			t.Errorf("%s: not printed by the probe", name)
		} else if g != w {
			t.Errorf("%s: headers say %#x, abi.go %#x", name, g, w)
		}
	}
}

// TestEncodings: the argument buffers put each field where the headers do
// (offsets checked above), in native order.
func TestEncodings(t *testing.T) {
	b := encodeMapGrantRef(5, []uint32{9, 0xfffffffe})
	if len(b) != 32 || ne.Uint32(b[0:]) != 2 || ne.Uint32(b[16:]) != 5 || ne.Uint32(b[20:]) != 9 ||
		ne.Uint32(b[24:]) != 5 || ne.Uint32(b[28:]) != 0xfffffffe || ne.Uint64(b[8:]) != 0 {
		t.Errorf("map: % x", b)
	}
	u := encodeUnmapGrantRef(0x12345000, 3)
	if len(u) != 16 || ne.Uint64(u) != 0x12345000 || ne.Uint32(u[8:]) != 3 {
		t.Errorf("unmap: % x", u)
	}
	bi := encodeBindInterdomain(7, 33)
	if len(bi) != 8 || ne.Uint32(bi) != 7 || ne.Uint32(bi[4:]) != 33 {
		t.Errorf("bind: % x", bi)
	}
}
