package vmdk

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"

	"github.com/blktap-go/blktap/formats/image"
)

// maxExtents bounds the extent lines of one descriptor (each is an open file).
const maxExtents = 4096

// noParentCID is the parentCID of an image without a parent.
const noParentCID = 0xffffffff

// Descriptor is a parsed VMDK text descriptor.
type Descriptor struct {
	Version            int
	CID                uint32
	ParentCID          uint32
	CreateType         string
	ParentFileNameHint string
	Extents            []ExtentDesc
	// DDB holds the disk database (ddb.* keys), Other any other key=value.
	DDB   map[string]string
	Other map[string]string
}

// ExtentDesc is one extent line:
//
//	ACCESS SECTORS TYPE ["FILE" [OFFSET]]
//
// e.g. `RW 204800 FLAT "disk-flat.vmdk" 0` or `RW 2048 ZERO`.
type ExtentDesc struct {
	Access  string // RW, RDONLY or NOACCESS
	Sectors int64
	Type    string // SPARSE, FLAT, ZERO, VMFS, VMFSSPARSE, SESPARSE, ...
	File    string
	Offset  int64 // sectors into File (FLAT and VMFS)
	Line    int   // line number in the descriptor, for errors
}

func descErr(line int, class error, format string, args ...any) error {
	return &image.FormatError{Format: "vmdk", Offset: -1, Field: fmt.Sprintf("descriptor line %d", line), Err: class, Detail: fmt.Sprintf(format, args...)}
}

// ParseDescriptor parses descriptor text strictly: every line must be a
// comment, a key=value pair or an extent line; required keys must be
// present once; numbers must parse. The text ends at the first NUL, as
// for every reader of the format: embedded descriptors are NUL-padded
// sectors, and qemu leaves stale bytes after the NUL when it rewrites one.
func ParseDescriptor(text []byte) (*Descriptor, error) {
	if i := bytes.IndexByte(text, 0); i >= 0 {
		text = text[:i]
	}
	if len(text) > maxDescriptor {
		return nil, descErr(0, image.ErrCorrupt, "descriptor of %d bytes (limit %d)", len(text), maxDescriptor)
	}
	p := descParser{d: &Descriptor{DDB: map[string]string{}, Other: map[string]string{}, ParentCID: noParentCID}, seen: map[string]bool{}}
	for n, raw := range strings.Split(string(text), "\n") {
		line := n + 1
		s := strings.TrimSpace(strings.TrimSuffix(raw, "\r"))
		if s == "" || s[0] == '#' {
			continue
		}
		var err error
		if acc, _, ok := strings.Cut(s, " "); ok && (acc == "RW" || acc == "RDONLY" || acc == "NOACCESS") {
			err = p.extent(s, line)
		} else {
			err = p.keyValue(s, line)
		}
		if err != nil {
			return nil, err
		}
	}
	return p.complete()
}

// descParser holds what ParseDescriptor has read so far.
type descParser struct {
	d     *Descriptor
	seen  map[string]bool // keys read, each allowed once
	total uint64          // sectors of the extents read
}

func (p *descParser) extent(s string, line int) error {
	e, err := parseExtentLine(s, line)
	if err != nil {
		return err
	}
	if len(p.d.Extents) == maxExtents {
		return descErr(line, image.ErrUnsupported, "more than %d extents", maxExtents)
	}
	p.total += uint64(e.Sectors)
	if p.total > maxCapacitySects {
		return descErr(line, image.ErrCorrupt, "extents total more than %d sectors", uint64(maxCapacitySects))
	}
	p.d.Extents = append(p.d.Extents, e)
	return nil
}

func (p *descParser) keyValue(s string, line int) error {
	key, val, err := splitKeyValue(s, line)
	if err != nil {
		return err
	}
	if p.seen[key] {
		return descErr(line, image.ErrCorrupt, "duplicate key %s", key)
	}
	p.seen[key] = true
	d := p.d
	switch key {
	case "version":
		d.Version, err = strconv.Atoi(val)
		if err != nil || d.Version < 1 || d.Version > 3 {
			return descErr(line, image.ErrUnsupported, "descriptor version %q", val)
		}
	case "CID":
		d.CID, err = parseCID(val)
	case "parentCID":
		d.ParentCID, err = parseCID(val)
	case "createType":
		d.CreateType = val
	case "parentFileNameHint":
		d.ParentFileNameHint = val
	default:
		if strings.HasPrefix(key, "ddb.") {
			d.DDB[key] = val
		} else {
			d.Other[key] = val
		}
	}
	if err != nil {
		return descErr(line, image.ErrCorrupt, "%s: %v", key, err)
	}
	return nil
}

// splitKeyValue reads `key = value` or `key = "value"`: one quoted value
// per line, no quote anywhere else.
func splitKeyValue(s string, line int) (key, val string, err error) {
	key, val, ok := strings.Cut(s, "=")
	if !ok {
		return "", "", descErr(line, image.ErrCorrupt, "neither a comment, key=value nor an extent: %.60q", s)
	}
	key, val = strings.TrimSpace(key), strings.TrimSpace(val)
	if key == "" || strings.ContainsAny(key, " \t\"") {
		return "", "", descErr(line, image.ErrCorrupt, "bad key %.60q", key)
	}
	if strings.HasPrefix(val, `"`) {
		if len(val) < 2 || !strings.HasSuffix(val, `"`) || strings.Count(val, `"`) != 2 {
			return "", "", descErr(line, image.ErrCorrupt, "unterminated quoted value for %s", key)
		}
		val = val[1 : len(val)-1]
	} else if strings.Contains(val, `"`) {
		return "", "", descErr(line, image.ErrCorrupt, "stray quote in the value of %s", key)
	}
	return key, val, nil
}

// complete checks the keys and lines every descriptor must have.
func (p *descParser) complete() (*Descriptor, error) {
	if !p.seen["version"] {
		return nil, descErr(0, image.ErrCorrupt, "no version= line")
	}
	if p.d.CreateType == "" {
		return nil, descErr(0, image.ErrCorrupt, "no createType")
	}
	if len(p.d.Extents) == 0 {
		return nil, descErr(0, image.ErrCorrupt, "no extent lines")
	}
	return p.d, nil
}

func parseCID(s string) (uint32, error) {
	if len(s) == 0 || len(s) > 8 {
		return 0, fmt.Errorf("CID %q is not 1-8 hex digits", s)
	}
	v, err := strconv.ParseUint(s, 16, 32)
	if err != nil {
		return 0, fmt.Errorf("CID %q is not hex", s)
	}
	return uint32(v), nil
}

func parseExtentLine(s string, line int) (ExtentDesc, error) {
	e := ExtentDesc{Line: line}
	// The file name is the only quoted token and may hold spaces.
	head, rest, quoted := strings.Cut(s, `"`)
	var file, tail string
	if quoted {
		var ok bool
		file, tail, ok = strings.Cut(rest, `"`)
		if !ok {
			return e, descErr(line, image.ErrCorrupt, "unterminated extent file name")
		}
		if strings.Contains(tail, `"`) {
			return e, descErr(line, image.ErrCorrupt, "stray quote after the extent file name")
		}
		if file == "" {
			return e, descErr(line, image.ErrCorrupt, "empty extent file name")
		}
		if head != "" && head[len(head)-1] != ' ' && head[len(head)-1] != '\t' {
			return e, descErr(line, image.ErrCorrupt, "no space before the extent file name")
		}
	}
	f := strings.Fields(head)
	if len(f) != 3 {
		return e, descErr(line, image.ErrCorrupt, "extent needs ACCESS SECTORS TYPE, got %d fields", len(f))
	}
	e.Access, e.Type = f[0], f[2]
	n, err := strconv.ParseInt(f[1], 10, 64)
	if err != nil || n <= 0 || n > maxCapacitySects {
		return e, descErr(line, image.ErrCorrupt, "extent size %q sectors", f[1])
	}
	e.Sectors = n
	e.File = file
	t := strings.Fields(tail)
	switch {
	case !quoted && e.Type != "ZERO":
		return e, descErr(line, image.ErrCorrupt, "%s extent without a file name", e.Type)
	case quoted && e.Type == "ZERO":
		return e, descErr(line, image.ErrCorrupt, "ZERO extent with a file name")
	case len(t) > 1:
		return e, descErr(line, image.ErrCorrupt, "extra fields after the extent offset")
	case len(t) == 1:
		if !hasOffset(e.Type) {
			return e, descErr(line, image.ErrCorrupt, "offset on a %s extent", e.Type)
		}
		off, err := strconv.ParseInt(t[0], 10, 64)
		if err != nil || off < 0 || off > maxCapacitySects-n {
			return e, descErr(line, image.ErrCorrupt, "extent offset %q", t[0])
		}
		e.Offset = off
	}
	return e, nil
}

// marshal renders the descriptor in the layout qemu and VMware write.
func (d *Descriptor) marshal() []byte {
	var b bytes.Buffer
	b.WriteString("# Disk DescriptorFile\n")
	fmt.Fprintf(&b, "version=%d\n", max(d.Version, 1))
	fmt.Fprintf(&b, "CID=%08x\n", d.CID)
	fmt.Fprintf(&b, "parentCID=%08x\n", d.ParentCID)
	fmt.Fprintf(&b, "createType=\"%s\"\n", d.CreateType)
	if d.ParentFileNameHint != "" {
		fmt.Fprintf(&b, "parentFileNameHint=\"%s\"\n", d.ParentFileNameHint)
	}
	b.WriteString("\n# Extent description\n")
	for _, e := range d.Extents {
		fmt.Fprintf(&b, "%s %d %s", e.Access, e.Sectors, e.Type)
		if e.Type != "ZERO" {
			fmt.Fprintf(&b, " \"%s\"", e.File)
		}
		if hasOffset(e.Type) {
			fmt.Fprintf(&b, " %d", e.Offset)
		}
		b.WriteByte('\n')
	}
	b.WriteString("\n# The Disk Data Base\n#DDB\n\n")
	for _, k := range []string{"ddb.virtualHWVersion", "ddb.geometry.cylinders", "ddb.geometry.heads", "ddb.geometry.sectors", "ddb.adapterType"} {
		if v, ok := d.DDB[k]; ok {
			fmt.Fprintf(&b, "%s = \"%s\"\n", k, v)
		}
	}
	return b.Bytes()
}

// hasOffset says whether an extent type carries a file offset.
func hasOffset(typ string) bool {
	return typ == "FLAT" || typ == "VMFS" || typ == "VMFSRAW" || typ == "VMFSRDM"
}
