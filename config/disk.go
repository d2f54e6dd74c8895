package config

import (
	"errors"
	"fmt"
	"math"
	"net"
	"slices"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/blktap-go/blktap/internal/rbdspec"
)

// top decodes the top-level mapping; explicit reports a disks key that
// holds a list, even an empty one.
func (p *parser) top(root *yaml.Node) (disks []Disk, explicit bool) {
	if root.Kind == yaml.ScalarNode && root.ShortTag() == "!!null" {
		return nil, false // a file of comments only
	}
	m := p.fields(root, "top level", "disks")
	dn, ok := m["disks"]
	if !ok {
		if m != nil {
			p.errf(root, "top level: no \"disks\" key")
		}
		return nil, false
	}
	if dn.Kind == yaml.ScalarNode && dn.ShortTag() == "!!null" {
		return nil, false
	}
	if dn.Kind != yaml.SequenceNode {
		p.errf(dn, "disks must be a list, not %s", kindName(dn))
		return nil, false
	}
	for i, n := range dn.Content {
		if d, m := p.disk(n, i); m != nil {
			disks = append(disks, d)
			p.nodes = append(p.nodes, m)
		}
	}
	return disks, len(dn.Content) == 0
}

var diskKeys = []string{"name", "image", "format", "mode", "domain", "device", "create", "export", "qos", "io"}

// IOEngines are the values of a disk's io key.
var IOEngines = []string{"auto", "threads", "uring"}

// disk decodes one entry and returns its key -> value nodes, nil when it
// is not a mapping. Fields with errors are left zero, and crossCheck skips
// zero values.
func (p *parser) disk(n *yaml.Node, i int) (Disk, map[string]*yaml.Node) {
	d := Disk{Line: n.Line, Mode: "w"}
	what := diskLabel(n, i)
	m := p.fields(n, what, diskKeys...)
	if m == nil {
		return d, nil
	}
	p.diskImage(n, m, what, &d)
	p.diskPlace(n, m, what, &d)
	if v, ok := m["create"]; ok {
		d.Create = p.create(v, what, d.Format)
	}
	if v, ok := m["export"]; ok {
		d.Export = p.export(v, what)
	}
	if v, ok := m["qos"]; ok {
		d.QoS = p.qos(v, what)
	}
	if v, ok := m["io"]; ok {
		if s, ok := p.str(v, what+": io"); ok {
			if slices.Contains(IOEngines, s) {
				d.IO = s
			} else {
				p.errf(v, "%s: io %q: want one of %s", what, s, strings.Join(IOEngines, ", "))
			}
		}
	}
	return d, m
}

// diskLabel names entry i (0-based) in messages: by its name when it has
// a valid one, even in those about keys that come before the name, else
// by its place in the list.
func diskLabel(n *yaml.Node, i int) string {
	if n.Kind == yaml.MappingNode {
		for j := 0; j+1 < len(n.Content); j += 2 {
			k, v := n.Content[j], n.Content[j+1]
			if k.Value == "name" && v.Kind == yaml.ScalarNode && v.Value != "" && checkName(v.Value) == nil {
				return fmt.Sprintf("disk %q", v.Value)
			}
		}
	}
	return fmt.Sprintf("disk %d", i+1)
}

// diskImage decodes what the disk is: name, format and image.
func (p *parser) diskImage(n *yaml.Node, m map[string]*yaml.Node, what string, d *Disk) {
	if v, ok := m["name"]; ok {
		if s, ok := p.str(v, what+": name"); ok {
			if err := checkName(s); err != nil {
				p.errf(v, "%s: name %q %v", what, s, err)
			} else {
				d.Name = s
			}
		}
	} else {
		p.errf(n, "%s: name is required", what)
	}
	if v, ok := m["format"]; ok {
		if s, ok := p.str(v, what+": format"); ok {
			if f, ok := normalizeFormat(s); ok {
				d.Format = f
			} else {
				p.errf(v, "%s: unknown format %q (valid: %s; aio = raw, vpc = vhd)",
					what, s, strings.Join(formats, ", "))
			}
		}
	} else {
		p.errf(n, "%s: format is required (%s)", what, strings.Join(formats, ", "))
	}
	if v, ok := m["image"]; ok {
		if d.Format == "nbd" || d.Format == "ram" || d.Format == "rbd" {
			// A URI, a RAM disk's name, or POOL/IMAGE: not paths.
			d.Image, _ = p.str(v, what+": image")
			if d.Format == "rbd" && d.Image != "" {
				if _, err := rbdspec.Parse(d.Image); err != nil {
					p.errf(v, "%s: image: %v", what, err)
				}
			}
		} else {
			d.Image, _ = p.path(v, what+": image")
		}
	} else {
		p.errf(n, "%s: image is required", what)
	}
}

// diskPlace decodes where and how the disk is attached: mode, domain and
// device.
func (p *parser) diskPlace(n *yaml.Node, m map[string]*yaml.Node, what string, d *Disk) {
	if v, ok := m["mode"]; ok {
		if s, ok := p.str(v, what+": mode"); ok {
			if s != "r" && s != "w" {
				p.errf(v, "%s: mode must be r or w, not %q", what, s)
			}
			d.Mode = s
		}
	}
	if v, ok := m["domain"]; ok {
		if id, ok := p.integer(v, what+": domain", 0, maxDomain); ok {
			d.Domain = uint32(id)
		}
	}
	if v, ok := m["device"]; ok {
		if s, ok := p.str(v, what+": device"); ok {
			id, err := ParseVdev(s)
			if err != nil {
				p.errf(v, "%s: %v", what, err)
			}
			d.Device, d.DevID = s, id
		}
	} else {
		p.errf(n, "%s: device is required (e.g. xvdb)", what)
	}
}

func (p *parser) create(n *yaml.Node, what, format string) *Create {
	m := p.fields(n, what+": create", append([]string{"size", "backing", "backing-format"}, rbdCreateKeys...)...)
	if m == nil {
		return nil
	}
	c := &Create{}
	if v, ok := m["size"]; ok {
		if s, ok := p.size(v, what+": create: size"); ok {
			if s == 0 {
				p.errf(v, "%s: create: size must be more than 0", what)
			}
			c.Size = s
		}
	} else {
		p.errf(n, "%s: create: size is required", what)
	}
	if v, ok := m["backing"]; ok {
		c.Backing, _ = p.path(v, what+": create: backing")
	}
	if v, ok := m["backing-format"]; ok {
		if s, ok := p.str(v, what+": create: backing-format"); ok {
			if f, ok := normalizeFormat(s); ok && f != "ram" && f != "nbd" && f != "rbd" {
				c.BackingFormat = f
			} else {
				p.errf(v, "%s: create: backing-format %q is not an image file format", what, s)
			}
		}
		if _, ok := m["backing"]; !ok {
			p.errf(v, "%s: create: backing-format without backing", what)
		}
	}
	switch format {
	case "ram", "nbd":
		p.errf(n, "%s: create: a %s disk has no image file to create", what, format)
	case "raw", "rbd":
		if c.Backing != "" {
			p.errf(m["backing"], "%s: create: %s images cannot have a backing file", what, format)
		}
	}
	switch format {
	case "rbd":
		p.rbdCreate(m, what, c)
	case "ram", "nbd": // refused whole above
	default:
		p.notRBDCreate(m, what, format)
	}
	return c
}

func (p *parser) export(n *yaml.Node, what string) Export {
	var e Export
	m := p.fields(n, what+": export", "socket", "tcp", "tls", "insecure")
	if m == nil {
		return e
	}
	sn, hasSock := m["socket"]
	tn, hasTCP := m["tcp"]
	switch {
	case hasSock && hasTCP:
		p.errf(n, "%s: export: socket or tcp, not both", what)
	case !hasSock && !hasTCP:
		p.errf(n, "%s: export: give socket or tcp, or leave export out for the default", what)
	}
	if hasSock {
		if s, ok := p.path(sn, what+": export: socket"); ok {
			if len(s) > maxSocketPath {
				p.errf(sn, "%s: export: socket path %q is %d bytes; unix sockets allow %d",
					what, s, len(s), maxSocketPath)
			}
			e.Socket = s
		}
	}
	host := ""
	if hasTCP {
		if s, ok := p.str(tn, what+": export: tcp"); ok {
			h, port, err := net.SplitHostPort(s)
			if err != nil {
				p.errf(tn, "%s: export: tcp %q must be host:port (e.g. 127.0.0.1:10809)", what, s)
			} else if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
				p.errf(tn, "%s: export: tcp port %q must be 1..65535", what, port)
			} else if h == "" {
				p.errf(tn, "%s: export: tcp needs a host (127.0.0.1 for loopback only)", what)
			}
			e.TCP, host = s, h
		}
	}
	tlsN, hasTLS := m["tls"]
	if hasTLS {
		e.TLSCert, e.TLSKey, e.TLSCA = p.tls(tlsN, what)
	}
	insN, hasIns := m["insecure"]
	insOK := true
	if hasIns {
		e.Insecure, insOK = p.boolean(insN, what+": export: insecure")
	}
	// The transport rules apply once the transport is clear.
	switch {
	case hasSock && hasTCP:
	case hasSock && hasTLS:
		p.errf(tlsN, "%s: export: tls is for tcp exports; a unix socket is guarded by its file mode (0600)", what)
	case hasSock && hasIns:
		p.errf(insN, "%s: export: insecure is for tcp exports; a unix socket is never encrypted", what)
	case hasTCP && hasTLS && hasIns:
		p.errf(insN, "%s: export: tls or insecure, not both", what)
	case !insOK:
		// Already reported; what was meant is unknown.
	case hasTCP && !hasTLS && !e.Insecure:
		p.errf(tn, "%s: export: a tcp export needs tls: {cert: FILE, key: FILE} or, on loopback only, insecure: true", what)
	case hasTCP && e.Insecure && host != "" && !isLoopback(host):
		p.errf(insN, "%s: export: insecure is allowed on loopback only; %q is reachable from elsewhere, so it needs tls", what, host)
	}
	return e
}

// tls reads an export's tls mapping: cert and key required, ca optional.
func (p *parser) tls(n *yaml.Node, what string) (cert, key, ca string) {
	w := what + ": export: tls"
	m := p.fields(n, w, "cert", "key", "ca")
	if m == nil {
		return
	}
	if v, ok := m["cert"]; ok {
		cert, _ = p.path(v, w+": cert")
	} else {
		p.errf(n, "%s: cert is required (the server's PEM certificate chain)", w)
	}
	if v, ok := m["key"]; ok {
		key, _ = p.path(v, w+": key")
	} else {
		p.errf(n, "%s: key is required (the server's PEM private key)", w)
	}
	if v, ok := m["ca"]; ok {
		ca, _ = p.path(v, w+": ca")
	}
	return
}

// isLoopback reports whether host names this machine only. A name other
// than localhost is not trusted to stay loopback: DNS may say otherwise.
func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func (p *parser) qos(n *yaml.Node, what string) QoS {
	var q QoS
	m := p.fields(n, what+": qos", "iops", "bandwidth")
	if v, ok := m["iops"]; ok {
		q.IOPS, _ = p.integer(v, what+": qos: iops", 0, math.MaxInt64)
	}
	if v, ok := m["bandwidth"]; ok {
		q.Bandwidth, _ = p.size(v, what+": qos: bandwidth")
	}
	return q
}

// checkName keeps names usable as file names (STATE/NAME.sock) and as
// xenstore values.
func checkName(s string) error {
	if s == "." || s == ".." {
		return errors.New("is not a usable file name")
	}
	if len(s) > 64 {
		return errors.New("is longer than 64 characters")
	}
	for _, c := range s {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '_', c == '-':
		default:
			return fmt.Errorf("has %q; use only A-Z a-z 0-9 . _ -", c)
		}
	}
	return nil
}

// crossCheck finds conflicts between disks: a name, a (domain, device) or
// an export used twice, or an image shared where one user may write.
func (p *parser) crossCheck(disks []Disk) {
	names := map[string]int{}
	devs := map[[2]uint32]int{}
	exports := map[string]int{}
	images := map[string]*Disk{} // the first disk on each image file
	for i := range disks {
		d := &disks[i]
		at := func(key string, format string, args ...any) {
			e := &Error{File: p.file, Line: d.Line, Msg: fmt.Sprintf(format, args...)}
			if n := p.nodes[i][key]; n != nil {
				e.Line, e.Col = n.Line, n.Column
			}
			p.errs = append(p.errs, e)
		}
		if d.Name == "" {
		} else if l, dup := names[d.Name]; dup {
			at("name", "disk %q: name already used by the disk at line %d", d.Name, l)
		} else {
			names[d.Name] = d.Line
		}
		k := [2]uint32{d.Domain, d.DevID}
		if d.DevID == 0 {
		} else if l, dup := devs[k]; dup {
			at("device", "disk %q: domain %d device %s (%d) already used by the disk at line %d",
				d.Name, d.Domain, VdevName(d.DevID), d.DevID, l)
		} else {
			devs[k] = d.Line
		}
		for _, ex := range []string{d.Export.Socket, d.Export.TCP} {
			if ex == "" {
				continue
			}
			if l, dup := exports[ex]; dup {
				at("export", "disk %q: export %q already used by the disk at line %d", d.Name, ex, l)
			} else {
				exports[ex] = d.Line
			}
		}
		if d.Image == "" || d.Format == "nbd" || d.Format == "ram" {
			continue
		}
		image := d.Image
		if d.Format == "rbd" {
			// One image, however the options that reach it are spelled.
			spec, _ := rbdspec.Parse(d.Image)
			image = "rbd:" + spec.WithoutSnap().Name()
		}
		// Two writers on one image corrupt it, and a reader beside a
		// writer sees torn data: only read-only disks may share.
		if prev, dup := images[image]; !dup {
			images[image] = d
		} else if prev.Mode == "w" || d.Mode == "w" {
			at("image", "disk %q: image %q is also used by the disk at line %d; only read-only (mode r) disks may share an image",
				d.Name, d.Image, prev.Line)
		}
	}
}
