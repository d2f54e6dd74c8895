package reconciler

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/formats/nbd"
	"github.com/blktap-go/blktap/formats/ram"
)

// Whoever can write a device's params (a toolstack, a YAML file, `blktap
// attach`) chooses what the worker opens. Image files are confined to the
// image directories (checkImageDir); the sources that are not files are
// confined here: an nbd: source only where the operator allowed it (a
// worker that dials anything is a way into other hosts' NBD servers, or
// into local sockets of other services), and a ram: disk no larger than
// the memory the operator gave RAM disks.

// ErrNotAllowed reports a source outside what the operator allowed.
var ErrNotAllowed = errors.New("not allowed")

// checkSource applies the confinement rules to an image about to be
// opened: format is canonical, path as in the params.
func (d *Daemon) checkSource(format, path string) error {
	switch {
	case formats.IsFile(format):
		return d.checkImageDir(path)
	case format == "nbd":
		return d.checkNBDSource(path)
	case format == "ram":
		return d.checkRAMSize(path)
	case format == "rbd":
		return d.checkRBDSource(path)
	}
	return nil
}

// checkNBDSource allows an NBD URI whose server --nbd-allow names, or
// whose unix socket lies in an image directory.
func (d *Daemon) checkNBDSource(uri string) error {
	u, err := nbd.ParseURI(uri)
	if err != nil {
		return err
	}
	if u.Network == "unix" {
		if !filepath.IsAbs(u.Address) {
			return fmt.Errorf("nbd: socket %q is not an absolute path", u.Address)
		}
		if d.isControlSocket(u.Address) {
			// The state directory is an image directory, but the
			// daemon's API, xenstored and adoption sockets in it are
			// nobody's disk.
			return fmt.Errorf("nbd: socket %s is one of the daemon's own: %w", u.Address, ErrNotAllowed)
		}
		if d.checkImageDir(u.Address) == nil {
			return nil
		}
	}
	if NBDAllowed(u, d.opts.NBDAllow) {
		return nil
	}
	where := "host " + u.Address
	if u.Network == "unix" {
		where = "socket " + u.Address + " (outside the image directories)"
	}
	return fmt.Errorf("nbd: %s: %w: add it to blktap run's --nbd-allow", where, ErrNotAllowed)
}

// isControlSocket reports whether sock (symlinks resolved) is the API
// socket, the embedded xenstored's, or a worker's adoption socket.
func (d *Daemon) isControlSocket(sock string) bool {
	sock = resolve(sock)
	state := resolve(d.opts.StateDir)
	return sock == filepath.Join(state, APISocket) || sock == filepath.Join(state, EmbeddedSocket) ||
		strings.HasPrefix(sock, filepath.Join(state, workersDir)+"/")
}

// CheckNBDAllow validates --nbd-allow entries: an absolute path (a socket,
// or a directory of sockets), an address block (10.0.0.0/8), HOST:PORT,
// or a HOST with any port. Names are matched as written, never resolved.
func CheckNBDAllow(entries []string) error {
	for _, e := range entries {
		switch {
		case e == "":
			return errors.New("--nbd-allow: an empty entry")
		case strings.HasPrefix(e, "/"):
		case strings.Contains(e, "/"):
			if _, _, err := net.ParseCIDR(e); err != nil {
				return fmt.Errorf("--nbd-allow %q: not an absolute path, an address block, HOST or HOST:PORT", e)
			}
		default:
			if h, p, err := net.SplitHostPort(e); err == nil {
				if n, err := strconv.ParseUint(p, 10, 16); err != nil || n == 0 || h == "" {
					return fmt.Errorf("--nbd-allow %q: want HOST:PORT with a port from 1 to 65535", e)
				}
			}
		}
	}
	return nil
}

// NBDAllowed reports whether u's server is one of allow's (see
// CheckNBDAllow for the forms).
func NBDAllowed(u nbd.URI, allow []string) bool {
	if u.Network == "unix" {
		sock := resolve(u.Address)
		for _, e := range allow {
			if !strings.HasPrefix(e, "/") {
				continue
			}
			e = resolve(e)
			if sock == e || strings.HasPrefix(sock, e+"/") || e == "/" {
				return true
			}
		}
		return false
	}
	host, port, err := net.SplitHostPort(u.Address)
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	for _, e := range allow {
		if strings.HasPrefix(e, "/") {
			continue
		}
		if _, block, err := net.ParseCIDR(e); err == nil {
			if ip != nil && block.Contains(ip) {
				return true
			}
			continue
		}
		eh, ep, err := net.SplitHostPort(e)
		if err != nil {
			eh, ep = strings.Trim(e, "[]"), ""
		}
		if ep != "" && ep != port {
			continue
		}
		if strings.EqualFold(eh, host) {
			return true
		}
		if eip := net.ParseIP(eh); eip != nil && ip != nil && eip.Equal(ip) {
			return true
		}
	}
	return false
}

// resolve follows the symlinks of p, or of its directory when p does
// not exist yet (a socket a server will create).
func resolve(p string) string {
	p = filepath.Clean(p)
	if real, err := filepath.EvalSymlinks(p); err == nil {
		return real
	}
	if dir, err := filepath.EvalSymlinks(filepath.Dir(p)); err == nil {
		return filepath.Join(dir, filepath.Base(p))
	}
	return p
}

// checkRAMSize refuses a RAM disk created larger than the cap. Attaching
// an existing disk by name allocates nothing and is not capped here.
func (d *Daemon) checkRAMSize(params string) error {
	name, size, err := ram.ParseParams(params)
	if err != nil {
		return err
	}
	limit := d.opts.RAMMax
	if limit <= 0 {
		limit = DefaultRAMMax()
	}
	if size > limit {
		return fmt.Errorf("ram:%s: size %s (%d bytes) is more than --ram-max %s (%d bytes); raise blktap run's --ram-max "+
			"(its default is half of this machine's memory)", name, formats.FormatSize(size), size, formats.FormatSize(limit), limit)
	}
	return nil
}

// DefaultRAMMax is --ram-max's default: half of MemTotal, so RAM disks
// alone cannot push the host into the OOM killer. Without /proc/meminfo
// it is 1 GiB.
func DefaultRAMMax() int64 {
	if total := memTotal("/proc/meminfo"); total > 0 {
		return total / 2
	}
	return 1 << 30
}

// memTotal reads MemTotal (bytes) from a meminfo file, 0 if it cannot.
func memTotal(path string) int64 {
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 3 && fields[0] == "MemTotal:" && fields[2] == "kB" {
			kb, err := strconv.ParseInt(fields[1], 10, 64)
			if err != nil || kb <= 0 {
				return 0
			}
			return kb << 10
		}
	}
	return 0
}
