package reconciler

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/blktap-go/blktap/tapengine/xen"
	"github.com/blktap-go/blktap/xenstore"
)

// HostFacts is what the machine says about Xen, for connectXenstore.
type HostFacts struct {
	Xen        bool     // a Xen host (or guest): /sys/hypervisor/type is "xen", or /proc/xen/capabilities exists
	MissingDev []string // of /dev/xen/gntdev and /dev/xen/evtchn, those absent
	// GrantCopy: gntdev has IOCTL_GNTDEV_GRANT_COPY (asked only on Xen
	// with gntdev present); GrantCopyErr: asking failed otherwise.
	GrantCopy    bool
	GrantCopyErr error
}

// ProbeHost looks at the machine; tests replace it. The default reads the
// real files.
var ProbeHost = probeRealHost

func probeRealHost() HostFacts {
	var f HostFacts
	if b, err := os.ReadFile("/sys/hypervisor/type"); err == nil && strings.TrimSpace(string(b)) == "xen" {
		f.Xen = true
	}
	if _, err := os.Stat("/proc/xen/capabilities"); err == nil {
		f.Xen = true
	}
	for _, p := range []string{"/dev/xen/gntdev", "/dev/xen/evtchn"} {
		if _, err := os.Stat(p); err != nil {
			f.MissingDev = append(f.MissingDev, p)
		}
	}
	if f.Xen && len(f.MissingDev) == 0 {
		f.GrantCopy, f.GrantCopyErr = xen.GrantCopyAvailable(xen.DefaultDir)
	}
	return f
}

// connectRealXenstore is connectXenstore on a Xen host. There the daemon
// must neither embed a xenstored (the toolstack would write to another
// one) nor play blkfront (it would write into real guests' frontend
// directories): anything missing is an error at start, with its fix.
func (d *Daemon) connectRealXenstore(ctx context.Context, f HostFacts) error {
	if len(f.MissingDev) > 0 {
		return fmt.Errorf("this is a Xen host but %s: modprobe xen-gntdev xen-evtchn",
			"missing "+strings.Join(f.MissingDev, " and "))
	}
	path := d.opts.XenstorePath
	if path == "" {
		path = xenstore.DefaultPath()
	}
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	c, err := xenstore.Dial(dctx, path)
	cancel()
	if err != nil {
		return fmt.Errorf("xenstored is not answering at %s (start xenstored / xencommons): %w", path, err)
	}
	d.xs, d.xsPath, d.localFrontend = c, path, false
	d.offerPersistent = offerPersistent(d.opts.PersistentGrants, false, f, d.log)
	if err := os.WriteFile(filepath.Join(d.opts.StateDir, XenstorePathFile), []byte(path+"\n"), 0o600); err != nil {
		c.Close()
		return err
	}
	return nil
}
