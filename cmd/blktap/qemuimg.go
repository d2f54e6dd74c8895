package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/blktap-go/blktap/formats"
	"github.com/spf13/pflag"
)

// outputFlag is qemu-img's --output=human|json, with our older --json
// kept as an alias.
type outputFlag struct {
	output *string
	json   *bool
}

func addOutputFlag(fs *pflag.FlagSet) outputFlag {
	return outputFlag{
		output: fs.String("output", "human", "print `human|json` (as qemu-img)"),
		json:   fs.Bool("json", false, "same as --output=json"),
	}
}

// isJSON reports whether JSON was asked for; any --output but human and
// json is a usage error, as in qemu-img.
func (o outputFlag) isJSON() (bool, error) {
	switch *o.output {
	case "json":
		return true, nil
	case "human":
		return *o.json, nil
	}
	return false, usagef("--output %q: want human or json", *o.output)
}

// isJSONForFile is isJSON for the commands that take one FILE operand
// (info, check, map): the --output check comes first, as it did in each.
func (o outputFlag) isJSONForFile(pos []string) (bool, error) {
	asJSON, err := o.isJSON()
	if err != nil {
		return false, err
	}
	if len(pos) != 1 {
		return false, usagef("want FILE")
	}
	return asJSON, nil
}

// writeQemuJSON prints v as qemu-img does: four-space indents, a newline
// at the end.
func writeQemuJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "    ")
	return enc.Encode(v)
}

// humanSize prints a byte count as qemu's size_to_str does: three
// significant digits in the largest binary unit that keeps the number
// under 1000 (so 1000 KiB is "0.977 MiB"), e.g. "196 KiB", "1.25 MiB".
func humanSize(n int64) string {
	suffixes := []string{"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}
	i := 0
	// The unit steps up once the value reaches 1000 of the smaller one,
	// i.e. n >= 1000 * 1024^(i-1) * 1024/1000 ... written in integers:
	// n*1024/1000 >= 1024^i.
	v := float64(n) * 1024 / 1000
	for i < len(suffixes)-1 && v >= float64(uint64(1)<<(10*(i+1))) {
		i++
	}
	return fmt.Sprintf("%s %sB", formatG3(float64(n)/float64(uint64(1)<<(10*i))), suffixes[i])
}

// formatG3 is C's "%0.3g".
func formatG3(f float64) string {
	return fmt.Sprintf("%.3g", f)
}

// dumpQemuHuman prints JSON-shaped data the way qemu's human output dumps
// a QAPI object: one "key: value" per line, kebab-case keys with spaces
// for dashes, lists as "[N]:" with their members one level deeper, in
// the order the JSON has them.
func dumpQemuHuman(w io.Writer, v any, indent int) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	return dumpValue(w, dec, indent, "")
}

// dumpValue prints the next JSON value of dec; label is its "key:" (or
// "[N]:") already decided by the caller, "" at the top.
func dumpValue(w io.Writer, dec *json.Decoder, indent int, label string) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	pad := strings.Repeat(" ", indent)
	switch t := tok.(type) {
	case json.Delim:
		if label != "" {
			fmt.Fprintf(w, "%s%s:\n", pad, label)
			indent += 4
		}
		if t == '{' {
			for dec.More() {
				k, err := dec.Token()
				if err != nil {
					return err
				}
				if err := dumpValue(w, dec, indent, strings.ReplaceAll(k.(string), "-", " ")); err != nil {
					return err
				}
			}
		} else {
			for n := 0; dec.More(); n++ {
				if err := dumpValue(w, dec, indent, fmt.Sprintf("[%d]", n)); err != nil {
					return err
				}
			}
		}
		_, err := dec.Token() // the closing delimiter
		return err
	default:
		fmt.Fprintf(w, "%s%s: %v\n", pad, label, t)
	}
	return nil
}

// qemuInfo is one image as qemu-img info --output=json describes it
// (qemu 7.2's ImageInfo).
type qemuInfo struct {
	Filename              string                  `json:"filename"`
	Format                string                  `json:"format"`
	VirtualSize           int64                   `json:"virtual-size"`
	ActualSize            *int64                  `json:"actual-size,omitempty"` // nil: not a file (rbd), as qemu omits it
	ClusterSize           int64                   `json:"cluster-size,omitempty"`
	DirtyFlag             bool                    `json:"dirty-flag"`
	BackingFilename       string                  `json:"backing-filename,omitempty"`
	FullBackingFilename   string                  `json:"full-backing-filename,omitempty"`
	BackingFilenameFormat string                  `json:"backing-filename-format,omitempty"`
	Snapshots             []formats.QemuSnapshot  `json:"snapshots,omitempty"`
	FormatSpecific        *formats.FormatSpecific `json:"format-specific,omitempty"`

	ourFormat string // the format as we name it, to reopen the image
}

// printInfoHuman prints one image as qemu-img info does.
func printInfoHuman(w io.Writer, in *qemuInfo) error {
	fmt.Fprintf(w, "image: %s\nfile format: %s\nvirtual size: %s (%d bytes)\ndisk size: %s\n",
		in.Filename, in.Format, humanSize(in.VirtualSize), in.VirtualSize, diskSize(in.ActualSize))
	if in.ClusterSize != 0 {
		fmt.Fprintf(w, "cluster_size: %d\n", in.ClusterSize)
	}
	if in.DirtyFlag {
		fmt.Fprintf(w, "cleanly shut down: no\n")
	}
	if in.BackingFilename != "" {
		fmt.Fprintf(w, "backing file: %s", in.BackingFilename)
		if in.FullBackingFilename != "" && in.FullBackingFilename != in.BackingFilename {
			fmt.Fprintf(w, " (actual path: %s)", in.FullBackingFilename)
		}
		fmt.Fprintln(w)
		if in.BackingFilenameFormat != "" {
			fmt.Fprintf(w, "backing file format: %s\n", in.BackingFilenameFormat)
		}
	}
	printSnapshotList(w, in.Snapshots)
	if in.FormatSpecific != nil {
		fmt.Fprintf(w, "Format specific information:\n")
		return dumpQemuHuman(w, in.FormatSpecific.Data, 4)
	}
	return nil
}

// printSnapshotList prints snapshots as qemu-img info and qemu-img
// snapshot -l do: nothing at all when there are none.
func printSnapshotList(w io.Writer, snaps []formats.QemuSnapshot) error {
	if len(snaps) == 0 {
		return nil
	}
	fmt.Fprintf(w, "Snapshot list:\n%-9s %-17s %7s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")
	for _, s := range snaps {
		clock := s.VMClockSec
		icount := ""
		if s.ICount != nil {
			icount = fmt.Sprint(*s.ICount)
		}
		// qemu 7.2's widths: a tag longer than the column still leaves a
		// space before the size.
		fmt.Fprintf(w, "%-9s %-16s %8s%20s%13s%11s\n", s.ID, s.Name, humanSize(int64(s.VMStateSize)),
			time.Unix(s.DateSec, s.DateNsec).Local().Format("2006-01-02 15:04:05"),
			fmt.Sprintf("%02d:%02d:%02d.%03d", clock/3600, clock/60%60, clock%60, s.VMClockNsec/1e6), icount)
	}
	return nil
}

// qemuCheck is qemu-img check --output=json's object (qemu 7.2's
// ImageCheck): counts that are zero are left out, as qemu leaves them.
type qemuCheck struct {
	Filename           string `json:"filename"`
	Format             string `json:"format"`
	CheckErrors        int64  `json:"check-errors"`
	ImageEndOffset     int64  `json:"image-end-offset,omitempty"`
	Corruptions        int64  `json:"corruptions,omitempty"`
	Leaks              int64  `json:"leaks,omitempty"`
	CorruptionsFixed   int64  `json:"corruptions-fixed,omitempty"`
	LeaksFixed         int64  `json:"leaks-fixed,omitempty"`
	TotalClusters      int64  `json:"total-clusters,omitempty"`
	AllocatedClusters  int64  `json:"allocated-clusters,omitempty"`
	FragmentedClusters int64  `json:"fragmented-clusters,omitempty"`
	CompressedClusters int64  `json:"compressed-clusters,omitempty"`
}

// printCheckHuman prints a check's summary as qemu-img check does.
func printCheckHuman(w io.Writer, c *qemuCheck) {
	if c.CorruptionsFixed != 0 || c.LeaksFixed != 0 {
		fmt.Fprintf(w, "The following inconsistencies were found and repaired:\n\n"+
			"    %d leaked clusters\n    %d corruptions\n\nDouble checking the fixed image now...\n",
			c.LeaksFixed, c.CorruptionsFixed)
	}
	if c.Corruptions == 0 && c.Leaks == 0 && c.CheckErrors == 0 {
		fmt.Fprintf(w, "No errors were found on the image.\n")
	} else {
		if c.Corruptions != 0 {
			fmt.Fprintf(w, "\n%d errors were found on the image.\n"+
				"Data may be corrupted, or further writes to the image may corrupt it.\n", c.Corruptions)
		}
		if c.Leaks != 0 {
			fmt.Fprintf(w, "\n%d leaked clusters were found on the image.\n"+
				"This means waste of disk space, but no harm to data.\n", c.Leaks)
		}
		if c.CheckErrors != 0 {
			fmt.Fprintf(w, "\n%d internal errors have occurred during the check.\n", c.CheckErrors)
		}
	}
	if c.TotalClusters != 0 && c.AllocatedClusters != 0 {
		a := float64(c.AllocatedClusters)
		fmt.Fprintf(w, "%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
			c.AllocatedClusters, c.TotalClusters, a*100/float64(c.TotalClusters),
			float64(c.FragmentedClusters)*100/a, float64(c.CompressedClusters)*100/a)
	}
	if c.ImageEndOffset != 0 {
		fmt.Fprintf(w, "Image end offset: %d\n", c.ImageEndOffset)
	}
}

// checkExit is qemu-img check's exit status: 2 for corruption, 3 for
// leaks only, 0 for a clean image (1, the check could not run, is any
// other error).
func checkExit(c *qemuCheck) error {
	switch {
	case c.Corruptions > 0:
		return exitCode(2)
	case c.Leaks > 0:
		return exitCode(3)
	}
	return nil
}

// mergeable reports whether b continues a as qemu-img map merges entries:
// the same depth, status and file, contiguous in it where an offset is known.
func mergeable(a, b *formats.QemuExtent) bool {
	return a.Start+a.Length == b.Start && a.Depth == b.Depth && a.Present == b.Present &&
		a.Zero == b.Zero && a.Data == b.Data && a.HasOffset == b.HasOffset &&
		(!a.HasOffset || a.Offset+a.Length == b.Offset) && a.File == b.File
}

// writeMapJSON prints entries byte for byte as qemu-img map
// --output=json: one object per line, "offset" only where known.
func writeMapJSON(w io.Writer, rows []formats.QemuExtent) {
	fmt.Fprint(w, "[")
	for i, e := range rows {
		fmt.Fprintf(w, `{ "start": %d, "length": %d, "depth": %d, "present": %t, "zero": %t, "data": %t`,
			e.Start, e.Length, e.Depth, e.Present, e.Zero, e.Data)
		if e.HasOffset {
			fmt.Fprintf(w, `, "offset": %d`, e.Offset)
		}
		fmt.Fprint(w, "}")
		if i < len(rows)-1 {
			fmt.Fprint(w, ",\n")
		}
	}
	fmt.Fprint(w, "]\n")
}

// writeMapHuman prints the runs that hold data, as qemu-img map does.
func writeMapHuman(w io.Writer, rows []formats.QemuExtent) error {
	fmt.Fprintf(w, "%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File")
	for _, e := range rows {
		if !e.Data || e.Zero {
			continue
		}
		if !e.HasOffset {
			return fmt.Errorf("map: data at %d is not stored at a plain file offset (compressed?); use --output=json", e.Start)
		}
		fmt.Fprintf(w, "%-16s%-16s%-16s%s\n", cHex(e.Start), cHex(e.Length), cHex(e.Offset), e.File)
	}
	return nil
}

// cHex is C's "%#x": 0 has no 0x.
func cHex(n int64) string {
	if n == 0 {
		return "0"
	}
	return fmt.Sprintf("%#x", n)
}

// diskSize is info's "disk size": qemu says "unavailable" where no file
// holds the image.
func diskSize(n *int64) string {
	if n == nil {
		return "unavailable"
	}
	return humanSize(*n)
}
