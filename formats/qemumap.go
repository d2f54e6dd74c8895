package formats

import (
	"errors"
	"fmt"
	"os"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/raw"
	"github.com/blktap-go/blktap/formats/vhd"
	"golang.org/x/sys/unix"
)

// QemuExtent is one run as qemu-img map reports it. Present: some layer
// of the chain defines the run; Zero: it reads as zeros; Data: it is
// stored (possibly as a file hole, then also Zero); Offset (when
// HasOffset) is where it starts in File, the file of layer Depth.
type QemuExtent struct {
	Start, Length int64
	Depth         int
	Present       bool
	Zero          bool
	Data          bool
	Offset        int64
	HasOffset     bool
	File          string
}

// hostExtenter is a layer that can say where its data lies in its file.
type hostExtenter interface {
	HostExtent(off, max int64) (name string, host, n int64, ok bool, err error)
}

type backinger interface {
	Backing() image.Image
}

type backingNamer interface {
	BackingFile() (string, string)
}

// MapQemu describes [off, off+length) of img, opened from path, with
// qemu-img map's meaning: host offsets where a layer stores data plainly,
// and, as qemu asks the file system beneath, runs of those that are holes
// in the file (or past its end) marked Zero as well as Data.
func MapQemu(img Image, path string, off, length int64) ([]QemuExtent, error) {
	exts, err := img.Map(off, length)
	if errors.Is(err, ErrUnsupported) {
		exts, err = []Extent{{Offset: off, Length: length, Kind: Data}}, nil
	}
	if err != nil {
		return nil, err
	}
	if _, ok := img.(*raw.Image); ok {
		// The file is the disk: every byte is present at its own offset,
		// and a hole is zero without data.
		out := make([]QemuExtent, 0, len(exts))
		for _, e := range exts {
			out = append(out, QemuExtent{Start: e.Offset, Length: e.Length, Present: true,
				Zero: e.Kind != Data, Data: e.Kind == Data, Offset: e.Offset, HasOffset: true, File: path})
		}
		return out, nil
	}
	m := &qemuMapper{files: map[string]*os.File{}}
	defer m.close()
	m.layers = append(m.layers, img)
	m.paths = append(m.paths, path)
	var out []QemuExtent
	for _, e := range exts {
		x, err := m.extent(e)
		if err != nil {
			return nil, err
		}
		out = append(out, x...)
	}
	return out, nil
}

type qemuMapper struct {
	layers []Image  // by depth
	paths  []string // by depth, as qemu names them
	files  map[string]*os.File
}

func (m *qemuMapper) close() {
	for _, f := range m.files {
		f.Close()
	}
}

// layer returns the image at depth d of the chain and its path, nil when
// the chain is shorter.
func (m *qemuMapper) layer(d int) (Image, string) {
	for len(m.layers) <= d {
		top := m.layers[len(m.layers)-1]
		b, ok := top.(backinger)
		n, ok2 := top.(backingNamer)
		if !ok || !ok2 || b.Backing() == nil {
			return nil, ""
		}
		name, _ := n.BackingFile()
		m.layers = append(m.layers, b.Backing())
		m.paths = append(m.paths, PathCombine(m.paths[len(m.paths)-1], name))
	}
	return m.layers[d], m.paths[d]
}

func (m *qemuMapper) extent(e Extent) ([]QemuExtent, error) {
	layer, file := m.layer(e.Depth)
	base := QemuExtent{Start: e.Offset, Length: e.Length, Depth: e.Depth}
	he, canHost := layer.(hostExtenter)
	if e.Kind != Data {
		if canHost {
			// A hole the layer still maps to its file (a fixed VHD, a flat
			// VMDK extent) is a hole in that file: data, as qemu sees it,
			// that the file system reports as zeros.
			if _, _, _, ok, err := he.HostExtent(e.Offset, e.Length); err != nil {
				return nil, err
			} else if ok {
				return m.hosted(base, he, file, true)
			}
		}
		base.Zero = true
		if e.Kind == Zero {
			base.Present = true
			return []QemuExtent{base}, nil
		}
		// qemu's vpc driver knows no backing files, so what a dynamic VHD
		// leaves unallocated is its own zeros, present at depth 0.
		base.Present = dynamicVHDAlone(layer)
		return []QemuExtent{base}, nil
	}
	base.Present, base.Data = true, true
	if !canHost {
		return []QemuExtent{base}, nil
	}
	// qemu's vpc driver names no file for its runs, so qemu asks the
	// file system about holes only below a fixed VHD.
	return m.hosted(base, he, file, !dynamicVHD(layer))
}

func dynamicVHDAlone(img Image) bool {
	v, ok := img.(*vhd.Image)
	return ok && v.Info().Subformat == "dynamic"
}

func dynamicVHD(img Image) bool {
	v, ok := img.(*vhd.Image)
	return ok && v.Info().Subformat != "fixed"
}

// hosted splits a data run by where the layer stores it, and each stored
// piece by the holes of the layer's file.
func (m *qemuMapper) hosted(base QemuExtent, he hostExtenter, file string, probe bool) ([]QemuExtent, error) {
	var out []QemuExtent
	end := base.Start + base.Length
	for pos := base.Start; pos < end; {
		name, host, n, ok, err := he.HostExtent(pos, end-pos)
		if err != nil {
			return nil, err
		}
		if n <= 0 {
			return nil, fmt.Errorf("map %s: no progress at %d", file, pos)
		}
		x := base
		x.Start, x.Length, x.Present, x.Data, x.File = pos, n, true, true, file
		if name != "" {
			x.File = PathCombine(file, name)
		}
		if !ok {
			// Compressed, or otherwise not a plain run of the file.
			out = append(out, x)
			pos += n
			continue
		}
		x.HasOffset, x.Offset = true, host
		if !probe {
			out = append(out, x)
			pos += n
			continue
		}
		runs, err := m.fileRuns(x.File, host, n)
		if err != nil {
			return nil, err
		}
		for _, r := range runs {
			y := x
			y.Start, y.Length, y.Offset, y.Zero = pos+(r.off-host), r.n, r.off, r.zero
			out = append(out, y)
		}
		pos += n
	}
	return out, nil
}

type fileRun struct {
	off, n int64
	zero   bool
}

// fileRuns splits [off, off+n) of a layer's file into data and holes;
// bytes past the end of the file are a hole too. Where the file system
// cannot tell, it is all data.
func (m *qemuMapper) fileRuns(path string, off, n int64) ([]fileRun, error) {
	f, ok := m.files[path]
	if !ok {
		var err error
		if f, err = os.Open(path); err != nil {
			return nil, err
		}
		m.files[path] = f
	}
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	size := st.Size()
	var out []fileRun
	add := func(o, l int64, zero bool) {
		if l <= 0 {
			return
		}
		if k := len(out) - 1; k >= 0 && out[k].zero == zero {
			out[k].n += l
			return
		}
		out = append(out, fileRun{o, l, zero})
	}
	end := off + n
	for pos := off; pos < end; {
		if pos >= size {
			add(pos, end-pos, true)
			break
		}
		data, err := unix.Seek(int(f.Fd()), pos, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			add(pos, end-pos, true)
			break
		}
		if err != nil {
			add(pos, end-pos, false)
			break
		}
		if data > pos {
			add(pos, min(data, end)-pos, true)
			pos = min(data, end)
			continue
		}
		hole, err := unix.Seek(int(f.Fd()), pos, unix.SEEK_HOLE)
		if err != nil {
			hole = end
		}
		add(pos, min(hole, end)-pos, false)
		pos = min(hole, end)
	}
	return out, nil
}
