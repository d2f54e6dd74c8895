package main

import (
	"bytes"
	"fmt"
	"io"
	"os"

	"github.com/blktap-go/blktap/formats"
	"github.com/spf13/pflag"
)

// imageCompare is qemu-img compare: exit 0 when the guest sees the same
// bytes in both (a longer image's tail must read as zeros), 1 when not,
// 2 when the comparison could not be made.
func imageCompare(fs *pflag.FlagSet) func(pos []string) error {
	f1 := fs.StringP("format", "f", "", "FILE1's `FMT` (default: probe)")
	f2 := fs.StringP("second-format", "F", "", "FILE2's `FMT` (default: probe)")
	strict := fs.BoolP("strict", "s", false, "strict: sizes and allocation must match too")
	quiet := fs.BoolP("quiet", "q", false, "print nothing; the exit status says it")
	fs.BoolP("progress", "p", false, "accepted for qemu-img's sake; no progress is shown")
	return func(pos []string) error {
		if len(pos) != 2 {
			return usagef("want FILE1 FILE2")
		}
		out := io.Writer(os.Stdout)
		if *quiet {
			out = io.Discard
		}
		// Status 1 means "different", so anything that stops the comparison
		// is 2, as in qemu-img.
		fail := func(err error) error {
			fmt.Fprintf(os.Stderr, "blktap image compare: %v\n", err)
			return exitCode(2)
		}
		a, err := openProbed(pos[0], *f1, true)
		if err != nil {
			return fail(err)
		}
		defer a.Close()
		b, err := openProbed(pos[1], *f2, true)
		if err != nil {
			return fail(err)
		}
		defer b.Close()
		diff, why, err := compareImages(a, pos[0], b, pos[1], *strict)
		if err != nil {
			return fail(err)
		}
		if a.Size() != b.Size() && why != "Strict mode: Image size mismatch!" {
			fmt.Fprintln(out, "Warning: Image size mismatch!")
		}
		if diff {
			fmt.Fprintln(out, why)
			return exitCode(1)
		}
		fmt.Fprintln(out, "Images are identical.")
		return nil
	}
}

// compareImages walks both images' maps together: runs zero in both are
// skipped, the rest is read and compared. A difference is reported at its
// 512-byte sector, as qemu-img reports it.
func compareImages(a formats.Image, pa string, b formats.Image, pb string, strict bool) (bool, string, error) {
	if strict && a.Size() != b.Size() {
		return true, "Strict mode: Image size mismatch!", nil
	}
	common := min(a.Size(), b.Size())
	ma, err := qemuMapRange(a, pa, 0, common)
	if err != nil {
		return false, "", err
	}
	mb, err := qemuMapRange(b, pb, 0, common)
	if err != nil {
		return false, "", err
	}
	mismatch := func(off int64) (bool, string, error) {
		return true, fmt.Sprintf("Content mismatch at offset %d!", off&^511), nil
	}
	bufA, bufB := make([]byte, 1<<20), make([]byte, 1<<20)
	for i, j, pos := 0, 0, int64(0); pos < common; {
		for ma[i].Start+ma[i].Length <= pos {
			i++
		}
		for mb[j].Start+mb[j].Length <= pos {
			j++
		}
		ea, eb := ma[i], mb[j]
		end := min(ea.Start+ea.Length, eb.Start+eb.Length)
		if strict && ea.Present != eb.Present {
			return true, fmt.Sprintf("Strict mode: Offset %d block status mismatch!", pos), nil
		}
		if !(ea.Zero && eb.Zero) { // runs known to read as zeros need no reading
			for p := pos; p < end; {
				n := min(int64(len(bufA)), end-p)
				if _, err := a.ReadAt(bufA[:n], p); err != nil {
					return false, "", err
				}
				if _, err := b.ReadAt(bufB[:n], p); err != nil {
					return false, "", err
				}
				if k := firstDifference(bufA[:n], bufB[:n]); k >= 0 {
					return mismatch(p + int64(k))
				}
				p += n
			}
		}
		pos = end
	}
	// The longer image's tail must read as zeros.
	long, path := a, pa
	if b.Size() > a.Size() {
		long, path = b, pb
	}
	tail, err := qemuMapRange(long, path, common, long.Size()-common)
	if err != nil {
		return false, "", err
	}
	for _, e := range tail {
		if e.Zero {
			continue
		}
		for p := e.Start; p < e.Start+e.Length; {
			n := min(int64(len(bufA)), e.Start+e.Length-p)
			if _, err := long.ReadAt(bufA[:n], p); err != nil {
				return false, "", err
			}
			if k := firstDifference(bufA[:n], make([]byte, n)); k >= 0 {
				return mismatch(p + int64(k))
			}
			p += n
		}
	}
	return false, "", nil
}

// qemuMapRange maps [off, off+n) in chunks, so a big image's map is never
// asked for at once.
func qemuMapRange(img formats.Image, path string, off, n int64) ([]formats.QemuExtent, error) {
	var all []formats.QemuExtent
	const chunk = 1 << 30
	for p := off; p < off+n; p += chunk {
		exts, err := formats.MapQemu(img, path, p, min(chunk, off+n-p))
		if err != nil {
			return nil, err
		}
		all = append(all, exts...)
	}
	return all, nil
}

// firstDifference is the index of the first byte where x and y (of one
// length) differ, or -1. Pieces are compared whole first, so only the
// piece holding the difference is walked byte by byte.
func firstDifference(x, y []byte) int {
	const piece = 4096
	for base := 0; base < len(x); base += piece {
		end := min(base+piece, len(x))
		if bytes.Equal(x[base:end], y[base:end]) {
			continue
		}
		for i := base; i < end; i++ {
			if x[i] != y[i] {
				return i
			}
		}
	}
	return -1
}
