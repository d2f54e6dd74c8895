package vmdk

import (
	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

// mapFlat reports the runs of [off, off+n) of a flat file as data, or as
// zero where the host file has a hole or ends. Files that cannot tell
// their holes are all data. emit gets offsets relative to off.
func mapFlat(f hostfile.File, off, n int64, emit func(o, n int64, k image.ExtentKind)) {
	sf, ok := f.(hostfile.Sparse)
	if !ok {
		emit(0, n, image.Data)
		return
	}
	size, err := f.Size()
	if err != nil {
		emit(0, n, image.Data)
		return
	}
	end := off + n
	for pos := off; pos < end; {
		d, err := sf.DataAfter(pos)
		if err != nil {
			emit(pos-off, end-pos, image.Data)
			return
		}
		if d >= size { // no data after pos: a trailing hole, or past the end
			emit(pos-off, end-pos, image.Zero)
			return
		}
		if d > pos {
			d = min(d, end)
			emit(pos-off, d-pos, image.Zero)
			pos = d
			if pos >= end {
				return
			}
		}
		h, err := sf.HoleAfter(pos)
		if err != nil || h <= pos {
			emit(pos-off, end-pos, image.Data)
			return
		}
		h = min(h, end)
		emit(pos-off, h-pos, image.Data)
		pos = h
	}
}
