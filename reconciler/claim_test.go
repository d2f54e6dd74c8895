package reconciler

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// On a Xen host backend/vbd is kernel blkback's: with --serve-vbd the
// daemon serves only the disks whose hotplug script is block-blktap and
// never touches another phy disk.
func TestVBDClaimsOnlyOwnScript(t *testing.T) {
	h := newHarness(t, false, serveVBD)
	theirs := Key{KindVBD, 3, 51728}
	ours := Key{KindVBD, 3, 51744}
	beTheirs, _ := h.libxlDisk(theirs, h.image("loop.raw"))
	h.write(beTheirs+"/script", "/etc/xen/scripts/block")
	beOurs, _ := h.libxlDisk(ours, "aio:"+h.image("ours.raw"))
	h.write(beOurs+"/script", "/etc/xen/scripts/"+OwnScript)
	h.waitFor("our disk at InitWait", map[string]string{beOurs + "/state": "2", beOurs + "/" + keyPhase: PhaseWaiting})
	time.Sleep(300 * time.Millisecond) // several resyncs
	if st := h.read(beTheirs + "/state"); st != "1" {
		t.Fatalf("blkback's disk: state %q, want it left at 1", st)
	}
	if _, err := h.xs.Read(t.Context(), beTheirs+"/blktap"); err == nil {
		t.Fatal("blkback's disk got a blktap status directory")
	}
	h.d.mu.Lock()
	dev := h.d.devices[theirs]
	h.d.mu.Unlock()
	if dev != nil && dev.worker.proc != nil {
		t.Fatal("a worker serves blkback's disk")
	}
}

// Kernel blkback bound to a device the daemon claims: both would serve
// one ring, so the disk fails with the fix instead of starting a worker.
func TestVBDBlkbackBoundRefused(t *testing.T) {
	sys := t.TempDir()
	old := blkbackSysfs
	blkbackSysfs = sys
	t.Cleanup(func() { blkbackSysfs = old })
	if err := os.MkdirAll(filepath.Join(sys, "devices", "vbd-3-51744"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../../drivers/vbd", filepath.Join(sys, "devices", "vbd-3-51744", "driver")); err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, false, serveVBD)
	k := Key{KindVBD, 3, 51744}
	be, _ := h.libxlDisk(k, "aio:"+h.image("ours.raw"))
	h.write(be+"/script", "/etc/xen/scripts/"+OwnScript)
	h.waitFor("refused", map[string]string{be + "/" + keyPhase: PhaseFailed})
	if msg := h.read(be + "/" + keyError); !strings.Contains(msg, "blacklist xen-blkback") {
		t.Fatalf("blktap/error = %q, want the blkback fix", msg)
	}
}

func serveVBD(o *Options) { o.ServeVBD = true }
