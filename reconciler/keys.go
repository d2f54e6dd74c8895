package reconciler

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// State is a XenbusState, stored in xenstore as a decimal string.
type State int

// XenbusState values (xen/include/public/io/xenbus.h).
const (
	StateUnknown       State = 0
	StateInitialising  State = 1
	StateInitWait      State = 2
	StateInitialised   State = 3
	StateConnected     State = 4
	StateClosing       State = 5
	StateClosed        State = 6
	StateReconfiguring State = 7
	StateReconfigured  State = 8
)

var stateNames = [...]string{"Unknown", "Initialising", "InitWait", "Initialised", "Connected", "Closing", "Closed", "Reconfiguring", "Reconfigured"}

func (s State) String() string {
	if s >= 0 && int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("State(%d)", int(s))
}

// ParseState reads a state key's value; anything else than a known
// decimal state is Unknown, as a backend treats garbage from a frontend.
func ParseState(v string) State {
	n, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil || n < 0 || n > int(StateReconfigured) {
		return StateUnknown
	}
	return State(n)
}

// Backend kinds the daemon serves (docs/WIRE.md, section "Toolstack keys").
const (
	KindVBD3 = "vbd3" // libxl's tap disks (tapback + tapdisk3 today)
	KindTap  = "tap"  // the 2006 blktap path
	KindVBD  = "vbd"  // the kernel blkback's, served only where none is present
)

// Key names one device: a backend directory.
type Key struct {
	Kind  string
	Domid uint32
	Devid uint32
}

func (k Key) String() string { return fmt.Sprintf("%s/%d/%d", k.Kind, k.Domid, k.Devid) }

// BackendPath is the device's backend directory under the daemon's domain.
func (k Key) BackendPath(backendDomid uint32) string {
	return fmt.Sprintf("/local/domain/%d/backend/%s/%d/%d", backendDomid, k.Kind, k.Domid, k.Devid)
}

// FrontendPath is where libxl puts the device's frontend directory.
func (k Key) FrontendPath() string {
	return fmt.Sprintf("/local/domain/%d/device/vbd/%d", k.Domid, k.Devid)
}

// parseBackendPath maps a path at or below a backend device directory to
// its key. ok is false for anything else (the kind directory itself, a
// domain directory, garbage a guest wrote).
func parseBackendPath(root, p string) (Key, bool) {
	rest, found := strings.CutPrefix(p, root+"/")
	if !found {
		return Key{}, false
	}
	parts := strings.SplitN(rest, "/", 4)
	if len(parts) < 3 {
		return Key{}, false
	}
	switch parts[0] {
	case KindVBD3, KindTap, KindVBD:
	default:
		return Key{}, false
	}
	dom, err1 := strconv.ParseUint(parts[1], 10, 32)
	dev, err2 := strconv.ParseUint(parts[2], 10, 32)
	if err1 != nil || err2 != nil {
		return Key{}, false
	}
	return Key{Kind: parts[0], Domid: uint32(dom), Devid: uint32(dev)}, true
}

// ParseParams splits a backend's params ("qcow:/img/a.qcow", "aio:/x",
// or a bare path meaning raw) into format and path.
func ParseParams(params string) (format, path string, err error) {
	params = strings.TrimSpace(params)
	if params == "" {
		return "", "", fmt.Errorf("empty params")
	}
	if strings.HasPrefix(params, "/") {
		return "raw", params, nil
	}
	format, path, ok := strings.Cut(params, ":")
	if !ok || path == "" {
		return "", "", fmt.Errorf("params %q: want FORMAT:PATH", params)
	}
	// "tap:aio:/x" as the seed's VM configs spell it.
	if format == "tap" || format == "tap2" {
		return ParseParams(path)
	}
	return format, path, nil
}

// emptyMedium reports params that name no image: what libxl writes for a
// CD-ROM drive with no disc ("", and "FORMAT:" with no path).
func emptyMedium(params string) bool {
	params = strings.TrimSpace(params)
	for {
		format, rest, ok := strings.Cut(params, ":")
		switch {
		case params == "":
			return true
		case !ok || strings.HasPrefix(params, "/"):
			return libxlEmptyCdrom(params)
		case format == "tap" || format == "tap2":
			params = rest
		default:
			return rest == ""
		}
	}
}

// libxlEmptyCdrom: since 4.19 libxl gives an empty phy CD-ROM drive a
// 0-byte file of its own, XEN_RUN_DIR/empty-cdrom.<domid>, as params.
func libxlEmptyCdrom(path string) bool {
	base := filepath.Base(path)
	n, ok := strings.CutPrefix(base, "empty-cdrom.")
	if !ok || n == "" || strings.Trim(n, "0123456789") != "" {
		return false
	}
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular() && st.Size() == 0
}
