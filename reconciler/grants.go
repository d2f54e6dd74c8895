package reconciler

import (
	"fmt"
	"log/slog"
)

// PersistentGrants says when the daemon offers blkif's feature-persistent
// (`blktap run --persistent-grants`).
//
// With persistent grants a frontend copies each request's data into pages
// it keeps granted, and the worker keeps them mapped. Without them Linux
// blkfront grants the request's own pages, and where the dom0 kernel has
// grant copy (Linux 4.7 on) the hypervisor copies between those pages and
// the worker's buffer: no copy inside the guest and no mapping at all.
// Under the harness's Xen it was as fast as persistent grants or faster
// in 11 of 12 timings of the same 32 MiB in one boot (docs/PERFORMANCE.md,
// "Grant copy by default"), and it is what QEMU's xen-block and tapdisk3
// do. So the default offers persistent grants only where grant copy is
// missing, where each page would otherwise be mapped and unmapped per
// request.
type PersistentGrants string

const (
	PersistentAuto PersistentGrants = "auto" // only where grant copy is missing
	PersistentOn   PersistentGrants = "on"   // always, as Linux blkback does
	PersistentOff  PersistentGrants = "off"  // never
)

// ParsePersistentGrants checks a --persistent-grants value; "" is auto.
func ParsePersistentGrants(s string) (PersistentGrants, error) {
	switch p := PersistentGrants(s); p {
	case "":
		return PersistentAuto, nil
	case PersistentAuto, PersistentOn, PersistentOff:
		return p, nil
	}
	return "", fmt.Errorf("--persistent-grants %q: want auto, on or off", s)
}

// offerPersistent decides, once per daemon, whether connecting backends
// publish feature-persistent. A local frontend maps no grants, so only the
// mode matters there; auto keeps offering it, as before.
func offerPersistent(mode PersistentGrants, localFrontend bool, f HostFacts, log *slog.Logger) bool {
	switch mode {
	case PersistentOn:
		return true
	case PersistentOff:
		return false
	}
	if localFrontend {
		return true
	}
	if f.GrantCopyErr != nil {
		log.Warn("grant copy probe failed; offering persistent grants", "err", f.GrantCopyErr)
		return true
	}
	if f.GrantCopy {
		log.Info("persistent grants not offered: this kernel's gntdev has grant copy")
		return false
	}
	log.Info("persistent grants offered: this kernel's gntdev has no grant copy")
	return true
}
