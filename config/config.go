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
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"

	"github.com/blktap-go/blktap/internal/rbdspec"
	"gopkg.in/yaml.v3"
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
	IO     string // I/O engine: "" (auto), or one of IOEngines
	Line   int    // where the disk's entry starts
}

// ReadOnly reports whether the disk is exported read-only.
func (d *Disk) ReadOnly() bool { return d.Mode == "r" }

// Create asks for the image to be made when it is missing.
type Create struct {
	Size          int64 // bytes
	Backing       string
	BackingFormat string // canonical, or "" (then the backing must be probed)
	// RBD holds an rbd disk's options (object size, features, striping,
	// data pool), checked; its Size is Size.
	RBD rbdspec.CreateOptions
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
