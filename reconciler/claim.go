package reconciler

import (
	"fmt"
	"os"
	"path"
)

// OwnScript is the hotplug script of the disks this daemon serves through
// backend/vbd (scripts/xen/block-blktap): libxl's
// `backendtype=phy, script=block-blktap, target=FORMAT:PATH`.
const OwnScript = "block-blktap"

// claimsVBD says whether a backend/vbd device is the daemon's to serve.
// On a Xen host backend/vbd is kernel blkback's directory: a `phy:` disk
// of another toolstack user, or a loop device libxl's `block` script set
// up, must be left alone, so only the disks whose hotplug script is ours
// and the ones the daemon declared itself are claimed. On the embedded
// default there is no blkback and every device is ours.
func (d *Daemon) claimsVBD(s snapshot) bool {
	if d.embedded != nil || d.localFrontend {
		return true
	}
	return s.Declared || path.Base(s.script) == OwnScript
}

// blkbackSysfs is where xenbus lists backend devices with the kernel
// driver bound to each (a variable for tests).
var blkbackSysfs = "/sys/bus/xen-backend"

// blkbackBound reports a device that kernel blkback serves as well: both
// would map the same ring and answer the same requests.
func blkbackBound(k Key) error {
	dev := fmt.Sprintf("%s/devices/%s-%d-%d/driver", blkbackSysfs, k.Kind, k.Domid, k.Devid)
	if _, err := os.Lstat(dev); err == nil {
		return fmt.Errorf("kernel blkback (xen-blkback) is bound to %s-%d-%d as well: "+
			"unload and blacklist it (modprobe -r xen-blkback; echo 'blacklist xen-blkback' >/etc/modprobe.d/blktap.conf)",
			k.Kind, k.Domid, k.Devid)
	}
	return nil
}

// blkbackLoaded: xen-blkback binds every backend/vbd device as it appears.
func blkbackLoaded() bool {
	_, err := os.Stat(blkbackSysfs + "/drivers/vbd")
	return err == nil
}
