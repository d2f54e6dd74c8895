package main

import (
	"fmt"
	"os"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/formats/qcow2"
	"github.com/spf13/pflag"
)

// qemuMeasure is qemu-img measure --output=json's object.
type qemuMeasure struct {
	Bitmaps        *int64 `json:"bitmaps,omitempty"`
	Required       int64  `json:"required"`
	FullyAllocated int64  `json:"fully-allocated"`
}

// imageMeasure is qemu-img measure: the file size an image of -O's format
// needs to hold FILE's data (or an empty one of --size), and when every
// cluster is allocated.
func imageMeasure(fs *pflag.FlagSet) func(pos []string) error {
	out := addOutputFlag(fs)
	outFmt := fs.StringP("output-format", "O", "raw", "the output's `FMT`: raw or qcow2")
	optStr := fs.StringP("options", "o", "", "the output's `OPTIONS` as for create (cluster_size, compat, refcount_bits, ...)")
	sizeStr := fs.String("size", "", "measure an empty image of this `SIZE` instead of FILE")
	inFmt := fs.StringP("format", "f", "", "FILE's `FMT` (default: probe)")
	return func(pos []string) error {
		asJSON, err := out.isJSON()
		if err != nil {
			return err
		}
		if (*sizeStr == "") == (len(pos) == 0) || len(pos) > 1 {
			return usagef("want either --size SIZE or FILE")
		}
		of, err := formats.Normalize(*outFmt)
		if err != nil {
			return usagef("%v", err)
		}
		opts, err := parseOpts(*optStr)
		if err != nil {
			return err
		}
		var co formats.CreateOptions
		if err := applyOpts(of, &co, opts); err != nil {
			return err
		}
		// What the source holds: its size, and the bytes of every output
		// cluster that has data in it (zeros need no cluster).
		var size, used int64
		var srcV3 bool
		if *sizeStr != "" {
			if size, err = formats.ParseSize(*sizeStr); err != nil {
				return usagef("--size: %v", err)
			}
		} else if size, used, srcV3, err = measureFile(pos[0], *inFmt, of, co.ClusterSize); err != nil {
			return err
		}
		var m qemuMeasure
		switch of {
		case "raw":
			m.Required = (size + 511) &^ 511
			m.FullyAllocated = m.Required
		case "qcow2":
			cs, rb := co.ClusterSize, co.RefcountBits
			if cs == 0 {
				cs = 64 << 10
			}
			v2 := co.Compat == "0.10" || co.Compat == "v2" || co.Subformat == "0.10" || co.Subformat == "v2"
			if rb == 0 {
				rb = 16
			} else if v2 && rb != 16 {
				return usagef("refcount_bits=%d needs compat=1.1", rb)
			}
			full, err := qcow2.FullyAllocatedSize(size, cs, rb)
			if err != nil {
				return usagef("%v", err)
			}
			m.FullyAllocated = full
			m.Required = full - (size+cs-1)/cs*cs + used
			if srcV3 && !v2 {
				// Persistent dirty bitmaps would be carried over; we keep
				// none, so their size is 0, as qemu reports for an image
				// without any.
				zero := int64(0)
				m.Bitmaps = &zero
			}
		default:
			fmt.Fprintf(os.Stderr, "blktap image measure: format %s does not support size measurement (raw and qcow2 do)\n", formats.QemuName(of))
			return exitCode(1)
		}
		if asJSON {
			return writeQemuJSON(os.Stdout, m)
		}
		fmt.Printf("required size: %d\nfully allocated size: %d\n", m.Required, m.FullyAllocated)
		if m.Bitmaps != nil {
			fmt.Printf("bitmaps size: %d\n", *m.Bitmaps)
		}
		return nil
	}
}

// measureFile reads what an image holds for measure: its size, the bytes
// of every output cluster (of clusterSize, for format of) that has data in
// it (zeros need no cluster), and whether it is a qcow2 version 3.
func measureFile(path, inFmt, of string, clusterSize int64) (size, used int64, srcV3 bool, err error) {
	in, err := openProbed(path, inFmt, true)
	if err != nil {
		return 0, 0, false, err
	}
	defer in.Close()
	size = in.Size()
	cs := clusterSize
	if cs == 0 {
		cs = 64 << 10
	}
	if of != "qcow2" {
		cs = 512
	}
	exts, err := qemuMapRange(in, path, 0, size)
	if err != nil {
		return 0, 0, false, err
	}
	// qemu rounds each data run out to whole clusters and goes on
	// after the last one it counted, so a cluster counts once.
	next := int64(0)
	for _, e := range exts {
		end := e.Start + e.Length
		if e.Zero || !e.Data || end <= next {
			continue
		}
		start := max(e.Start, next) / cs * cs
		next = (end + cs - 1) / cs * cs
		used += next - start
	}
	if q, ok := in.(*qcow2.Image); ok && q.Info().Version >= 3 {
		srcV3 = true
	}
	return size, used, srcV3, nil
}
