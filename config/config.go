// Package config reads the desired-state YAML file: the disks the daemon
// must serve. It imports nothing of the project but the leaves
// internal/units and internal/rbdspec (rbd image names).
//
// The file looks like this (examples/disks.yaml explains every key):
//
//	disks:
//	  - name: scratch           # [A-Za-z0-9._-]+, unique
//	    image: scratch.qcow2    # relative: against the YAML file's directory
//	    format: qcow2           # raw (alias aio) | qcow | qcow2 | vhd | vmdk | ram | nbd
//	    mode: w                 # r | w (default w)
//	    domain: 0               # 0 = dom0, N = guest N
//	    device: xvdb            # or the numeric virtual-device
//	    create: {size: 4G, backing: base.raw, backing-format: raw}
//	    export: {socket: /run/blktap/scratch.sock}   # or {tcp: 127.0.0.1:10809}
//	    qos: {iops: 5000, bandwidth: 200M}
//
// A tcp export also needs tls: {cert: FILE, key: FILE, ca: FILE} (ca
// optional: with it, client certificates are required) or, on a loopback
// host only, insecure: true.
//
// Parsing is strict: unknown keys, duplicate keys, wrong types and bad
// values are errors, each naming file:line:col, and Parse reports every
// problem it finds at once (errors.Join of *Error, each wrapping
// ErrInvalid).
//
// Caller's duties:
//
//  1. Load (or Parse) the file; on error show err.Error() whole: it has one
//     line per problem.
//  2. Use the returned File as is: defaults are applied (mode "w", format
//     names normalised, paths made absolute, DevID filled in).
//  3. Apply the default export (STATE/NAME.sock) where Export is empty;
//     this package does not know the state directory. Serve a TCP export
//     with TLS from Export.TLSCert, TLSKey and TLSCA (client certificates
//     required when TLSCA is set) unless Export.Insecure; the files are
//     not opened here.
//  4. Treat the File as read-only; Parse returns a new one each time.
//  5. Before a reload replaces a desired state that has disks, call
//     CheckDropAll: a file with no disks is an order to detach them all
//     only when it says disks: [].
package config

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"github.com/blktap-go/blktap/internal/units"
	"io"
	"math"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"gopkg.in/yaml.v3"

	"github.com/blktap-go/blktap/internal/rbdspec"
)

// MaxFileSize bounds the YAML file: a desired-state file is small, and a
// huge one is a mistake, not a fleet.
const MaxFileSize = 4 << 20

// maxSocketPath is sizeof(sun_path) minus the terminating NUL.
const maxSocketPath = 107

// maxDomain is the last guest domain id: DOMID_FIRST_RESERVED is 0x7FF0.
const maxDomain = 0x7FEF

// ErrInvalid is the class of every error about the file's contents.
var ErrInvalid = errors.New("invalid configuration")

// Error is one problem at a place in the file. It unwraps to ErrInvalid.
type Error struct {
	File      string
	Line, Col int // 1-based; 0 when unknown
	Msg       string
}

func (e *Error) Error() string {
	switch {
	case e.Line > 0 && e.Col > 0:
		return fmt.Sprintf("%s:%d:%d: %s", e.File, e.Line, e.Col, e.Msg)
	case e.Line > 0:
		return fmt.Sprintf("%s:%d: %s", e.File, e.Line, e.Msg)
	}
	return fmt.Sprintf("%s: %s", e.File, e.Msg)
}

func (e *Error) Unwrap() error { return ErrInvalid }

// File is a parsed desired-state file.
type File struct {
	Path  string // as given to Parse; absolute when from Load
	Disks []Disk
	// NoDisks is set when the file says in so many words that there are
	// none (disks: []). An empty file, one of comments only or a bare
	// "disks:" also parse to no disks, but they are what a half-written
	// save or a template that rendered nothing looks like: a daemon must
	// not take them as an order to detach everything.
	NoDisks bool
}

// ErrUntrusted is the class of errors about the file itself rather than
// its contents: not a regular file, or owned by someone else than root or
// the reader. Such a file is not parsed, so nothing of it is echoed.
var ErrUntrusted = errors.New("untrusted desired-state file")

// Disk is one desired disk.
type Disk struct {
	Name   string
	Image  string // absolute path; for format nbd, the NBD URI as written
	Format string // canonical: raw, qcow, qcow2, vhd, vmdk, ram, nbd
	Mode   string // "r" or "w"
	Domain uint32
	Device string // as written ("xvdb", "51728")
	DevID  uint32 // Device as a virtual-device number
	Create *Create
	Export Export
	QoS    QoS
	Line   int // where the disk's entry starts
}

// ReadOnly reports whether the disk is exported read-only.
func (d *Disk) ReadOnly() bool { return d.Mode == "r" }

// Create asks for the image to be made when it is missing.
type Create struct {
	Size          int64 // bytes
	Backing       string
	BackingFormat string // canonical, or "" (then the backing must be probed)
}

// Export says where the disk's NBD export listens. Socket and TCP both
// empty: the default, STATE/NAME.sock.
//
// A TCP export is either TLS-only (TLSCert and TLSKey set) or explicitly
// Insecure, and Insecure is accepted on loopback hosts only (127.0.0.0/8,
// ::1, localhost). A unix socket export has neither: its file mode guards
// it.
type Export struct {
	Socket string // unix socket path, absolute
	TCP    string // host:port
	// TLS files, absolute paths. TLSCA, when set, makes client
	// certificates mandatory and verified against it.
	TLSCert, TLSKey, TLSCA string
	Insecure               bool // plain TCP, asked for explicitly
}

// QoS limits a disk's I/O; zero means unlimited.
type QoS struct {
	IOPS      int64
	Bandwidth int64 // bytes per second
}

// formats lists the canonical format names this file may name.
var formats = []string{"raw", "qcow", "qcow2", "vhd", "vmdk", "ram", "nbd", "rbd"}

func normalizeFormat(s string) (string, bool) {
	switch s {
	case "aio":
		return "raw", true
	case "vpc":
		return "vhd", true
	}
	for _, f := range formats {
		if s == f {
			return s, true
		}
	}
	return "", false
}

// Load reads and parses the file at path. The file (a symlink's target)
// must be a regular file owned by root or by the effective uid: whoever
// can write it decides which images are served, and a FIFO or device
// would hang or feed the parser something that is not a file.
func Load(path string) (*File, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	// O_NONBLOCK: opening a FIFO must not wait for a writer before the
	// check below can refuse it.
	f, err := os.OpenFile(abs, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	if err := checkTrusted(abs, f, os.Geteuid()); err != nil {
		return nil, err
	}
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("config: %s: %w", abs, err)
	}
	return Parse(abs, data)
}

// ErrDropsAll reports a file that would take every disk away without
// saying so (see File.NoDisks).
var ErrDropsAll = errors.New("no disks, and the file does not say disks: []")

// CheckDropAll returns an error wrapping ErrDropsAll when f declares no
// disks, current (the number of disks of the desired state it would
// replace) is not zero, and f does not say disks: [] explicitly.
func (f *File) CheckDropAll(current int) error {
	if len(f.Disks) > 0 || f.NoDisks || current == 0 {
		return nil
	}
	return fmt.Errorf("config: %s: %w (empty, comments only or a bare \"disks:\": a half-written save?); "+
		"keeping the %d disks of the previous version; to detach every disk, write disks: []", f.Path, ErrDropsAll, current)
}

// checkTrusted refuses what Load must not read: anything but a regular
// file, and a file owned by another user than root or uid.
func checkTrusted(name string, f *os.File, uid int) error {
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("config: %s: %w: not a regular file (%s)", name, ErrUntrusted, st.Mode().Type())
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("config: %s: %w: its owner is unknown", name, ErrUntrusted)
	}
	if sys.Uid != 0 && int(sys.Uid) != uid {
		return fmt.Errorf("config: %s: %w: owned by uid %d; it must belong to root or to uid %d, which runs the daemon",
			name, ErrUntrusted, sys.Uid, uid)
	}
	return nil
}

// Parse decodes and validates data, the contents of the file called name.
// Relative paths in it resolve against name's directory, itself made
// absolute against the working directory when name is relative.
func Parse(name string, data []byte) (*File, error) {
	dir, err := filepath.Abs(filepath.Dir(name))
	if err != nil {
		return nil, fmt.Errorf("config: %s: %w", name, err)
	}
	p := &parser{file: name, dir: dir}
	if len(data) > MaxFileSize {
		p.errf(nil, "file is larger than %d bytes", MaxFileSize)
		return nil, p.err()
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	err = dec.Decode(&doc)
	switch {
	case errors.Is(err, io.EOF):
		// An empty file: no disks.
		return &File{Path: name}, nil
	case err != nil:
		p.yamlErr(err, data)
		return nil, p.err()
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		if err != nil {
			p.yamlErr(err, data)
		} else {
			p.errf(&extra, "a second YAML document; the file holds one")
		}
		return nil, p.err()
	}
	f := &File{Path: name}
	if len(doc.Content) == 1 {
		f.Disks, f.NoDisks = p.top(doc.Content[0])
	}
	p.crossCheck(f.Disks)
	if err := p.err(); err != nil {
		return nil, err
	}
	return f, nil
}

type parser struct {
	file  string
	dir   string
	errs  []error
	nodes []map[string]*yaml.Node // per decoded disk: key -> value node
}

// err joins the problems in file order.
func (p *parser) err() error {
	slices.SortStableFunc(p.errs, func(a, b error) int {
		ea, _ := a.(*Error)
		eb, _ := b.(*Error)
		if ea == nil || eb == nil {
			return 0
		}
		if c := cmp.Compare(ea.Line, eb.Line); c != 0 {
			return c
		}
		return cmp.Compare(ea.Col, eb.Col)
	})
	return errors.Join(p.errs...)
}

func (p *parser) errf(n *yaml.Node, format string, args ...any) {
	e := &Error{File: p.file, Msg: fmt.Sprintf(format, args...)}
	if n != nil {
		e.Line, e.Col = n.Line, n.Column
	}
	p.errs = append(p.errs, e)
}

// yamlErr turns yaml.v3's "yaml: line N: msg" into file:N: msg. yaml.v3
// gives no column and, for a tab in indentation, the line of the context
// rather than of the tab, so that case is located here.
func (p *parser) yamlErr(err error, data []byte) {
	if strings.Contains(err.Error(), "tab character") {
		for i, line := range strings.Split(string(data), "\n") {
			indent := line[:len(line)-len(strings.TrimLeft(line, " \t"))]
			if j := strings.IndexByte(indent, '\t'); j >= 0 {
				p.errs = append(p.errs, &Error{File: p.file, Line: i + 1, Col: j + 1,
					Msg: "a tab in the indentation; YAML indents with spaces"})
				return
			}
		}
	}
	var te *yaml.TypeError
	msgs := []string{err.Error()}
	if errors.As(err, &te) {
		msgs = te.Errors
	}
	for _, m := range msgs {
		m = strings.TrimPrefix(m, "yaml: ")
		e := &Error{File: p.file, Msg: m}
		if rest, ok := strings.CutPrefix(m, "line "); ok {
			if i := strings.Index(rest, ": "); i > 0 {
				if n, err := strconv.Atoi(rest[:i]); err == nil {
					e.Line, e.Msg = n, rest[i+2:]
				}
			}
		}
		p.errs = append(p.errs, e)
	}
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.AliasNode:
		return "an alias"
	case yaml.ScalarNode:
		if n.ShortTag() == "!!null" {
			return "nothing (null)"
		}
		return fmt.Sprintf("%s %q", strings.TrimPrefix(n.ShortTag(), "!!"), n.Value)
	}
	return "something else"
}

// fields checks a mapping's keys (strings, known, not repeated) and returns
// key -> value node, in file order via keys.
func (p *parser) fields(n *yaml.Node, what string, known ...string) map[string]*yaml.Node {
	if n.Kind == yaml.AliasNode {
		p.errf(n, "%s: anchors and aliases are not supported", what)
		return nil
	}
	if n.Kind != yaml.MappingNode {
		p.errf(n, "%s must be a mapping, not %s", what, kindName(n))
		return nil
	}
	out := make(map[string]*yaml.Node, len(n.Content)/2)
	seen := make(map[string]*yaml.Node, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.Kind != yaml.ScalarNode || k.ShortTag() == "!!null" {
			p.errf(k, "%s: keys must be names, not %s", what, kindName(k))
			continue
		}
		if prev, dup := seen[k.Value]; dup {
			p.errf(k, "%s: duplicate key %q (first at line %d)", what, k.Value, prev.Line)
			continue
		}
		seen[k.Value] = k
		ok := false
		for _, kn := range known {
			ok = ok || k.Value == kn
		}
		if !ok {
			p.errf(k, "%s: unknown key %q (valid: %s)", what, k.Value, strings.Join(known, ", "))
			continue
		}
		if v.Kind == yaml.AliasNode {
			p.errf(v, "%s: %s: anchors and aliases are not supported", what, k.Value)
			continue
		}
		out[k.Value] = v
	}
	return out
}

// str reads a scalar as text. Numbers are accepted (device: 51728), null,
// lists and mappings are not.
func (p *parser) str(n *yaml.Node, what string) (string, bool) {
	if n.Kind != yaml.ScalarNode || n.ShortTag() == "!!null" {
		p.errf(n, "%s must be a string, not %s", what, kindName(n))
		return "", false
	}
	if t := n.ShortTag(); t != "!!str" && t != "!!int" && t != "!!float" {
		p.errf(n, "%s must be a string, not %s", what, kindName(n))
		return "", false
	}
	if n.Value == "" {
		p.errf(n, "%s is empty", what)
		return "", false
	}
	if strings.ContainsRune(n.Value, 0) {
		p.errf(n, "%s contains a NUL byte", what)
		return "", false
	}
	return n.Value, true
}

// integer reads a YAML integer in [lo, hi].
func (p *parser) integer(n *yaml.Node, what string, lo, hi int64) (int64, bool) {
	if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!int" {
		p.errf(n, "%s must be an integer, not %s", what, kindName(n))
		return 0, false
	}
	v, err := strconv.ParseInt(strings.ReplaceAll(n.Value, "_", ""), 0, 64)
	if err != nil || v < lo || v > hi {
		p.errf(n, "%s must be an integer from %d to %d, not %s", what, lo, hi, n.Value)
		return 0, false
	}
	return v, true
}

// size reads a byte count: an integer, or a string with a K/M/G/T/P/E suffix.
func (p *parser) size(n *yaml.Node, what string) (int64, bool) {
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!int" {
		return p.integer(n, what, 0, math.MaxInt64)
	}
	if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!str" {
		p.errf(n, "%s must be a size like 512M or 4G, not %s", what, kindName(n))
		return 0, false
	}
	v, err := units.ParseSize(n.Value)
	if err != nil {
		p.errf(n, "%s: %v", what, err)
		return 0, false
	}
	return v, true
}

// path reads a file path and makes it absolute against the file's directory.
func (p *parser) path(n *yaml.Node, what string) (string, bool) {
	s, ok := p.str(n, what)
	if !ok {
		return "", false
	}
	if !filepath.IsAbs(s) {
		s = filepath.Join(p.dir, s)
	}
	return filepath.Clean(s), true
}

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

var diskKeys = []string{"name", "image", "format", "mode", "domain", "device", "create", "export", "qos"}

// disk decodes one entry and returns its key -> value nodes, nil when it
// is not a mapping. Fields with errors are left zero, and crossCheck skips
// zero values.
func (p *parser) disk(n *yaml.Node, i int) (Disk, map[string]*yaml.Node) {
	d := Disk{Line: n.Line, Mode: "w"}
	what := fmt.Sprintf("disk %d", i+1)
	if n.Kind == yaml.MappingNode {
		// Name the disk in every message, even those about keys that
		// come before its name.
		for j := 0; j+1 < len(n.Content); j += 2 {
			k, v := n.Content[j], n.Content[j+1]
			if k.Value == "name" && v.Kind == yaml.ScalarNode && v.Value != "" && checkName(v.Value) == nil {
				what = fmt.Sprintf("disk %q", v.Value)
				break
			}
		}
	}
	m := p.fields(n, what, diskKeys...)
	if m == nil {
		return d, nil
	}
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
	if v, ok := m["create"]; ok {
		d.Create = p.create(v, what, d.Format)
	}
	if v, ok := m["export"]; ok {
		d.Export = p.export(v, what)
	}
	if v, ok := m["qos"]; ok {
		d.QoS = p.qos(v, what)
	}
	return d, m
}

func (p *parser) create(n *yaml.Node, what, format string) *Create {
	m := p.fields(n, what+": create", "size", "backing", "backing-format")
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

// boolean reads a YAML true or false.
func (p *parser) boolean(n *yaml.Node, what string) (bool, bool) {
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!bool" {
		if v, err := strconv.ParseBool(strings.ToLower(n.Value)); err == nil {
			return v, true
		}
	}
	p.errf(n, "%s must be true or false, not %s", what, kindName(n))
	return false, false
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
