package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/tapengine/worker"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// imageNotes close `blktap image --help`.
const imageNotes = `formats: raw (alias aio), qcow, qcow2, vhd (alias vpc), vmdk
SIZE takes K, M, G, T suffixes (powers of 1024).
docs/QEMU-IMG.md: qemu-img's flags and output, tested.`

// imageCommands are the image tools, qemu-img's subcommands of the same
// names: flags, output and exit status as qemu-img's.
var imageCommands = []struct {
	use, short, long string
	setup            func(fs *pflag.FlagSet) func(pos []string) error
}{
	{"create [-f FMT] [-b BACKING [-F BFMT]] [-o KEY=VALUE,...|help] FILE [SIZE]", "create an image (SIZE, or -o size=, or the backing file's)", "", imageCreate},
	{"info [--output=human|json] [--backing-chain] [--detail] [-f FMT] FILE", "describe an image as qemu-img info does", "", imageInfo},
	{"check [--output=human|json] [-r leaks|all] [-f FMT] FILE", "check an image's metadata, and repair it with -r",
		"exit status as qemu-img's: 0 clean, 1 check failed (or a mistyped command line), 2 corruption, 3 leaks only", imageCheck},
	{"map [--output=human|json] [-f FMT] FILE", "list which ranges hold data, zeros or nothing", "", imageMap},
	{"convert [-p] [-c] [-f FMT] [-O FMT] [-o KEY=VALUE,...|help] IN OUT", "copy an image into another, of any format", "", imageConvert},
	{"compare [-f FMT] [-F FMT] [-s] [-q] FILE1 FILE2", "do two images show a guest the same bytes",
		"exit status as qemu-img's: 0 identical, 1 different, 2 could not compare", imageCompare},
	{"measure [--output=human|json] [-O FMT] [-o KEY=VALUE,...] (--size SIZE | [-f FMT] FILE)", "the file size an image needs", "", imageMeasure},
	{"resize [-f FMT] [--shrink] [--preallocation=off] [-q] FILE [+|-]SIZE", "change an image's virtual size (raw, qcow2, vhd)",
		"a smaller size needs --shrink; an image a worker or qemu has open is refused", imageResize},
	{"amend [-f FMT] -o KEY=VALUE,...|help FILE", "change a qcow2 image's compat, lazy_refcounts or size in place",
		"compat=0.10 turns zero clusters into zeros version 2 can read; lazy_refcounts=off leaves exact refcounts", imageAmend},
}

func newImageCommand() *cobra.Command {
	names := make([]string, len(imageCommands))
	for i, ic := range imageCommands {
		names[i], _, _ = strings.Cut(ic.use, " ")
	}
	c := leaf("image "+strings.Join(names, "|")+" ...", "image tools (`blktap image --help`)")
	c.Long = "The image tools.\n\n" + imageNotes
	// A missing or unknown subcommand is a usage error (cobra's own answer
	// is the help text and status 0).
	c.Args = cobra.ArbitraryArgs
	c.RunE = func(c *cobra.Command, args []string) error {
		if len(args) == 0 {
			return usagef("want a subcommand (blktap image --help)")
		}
		if args[0] == "help" {
			writeHelp(c.OutOrStdout(), c)
			return nil
		}
		return usagef("unknown subcommand %q (blktap image --help)", args[0])
	}
	for _, ic := range imageCommands {
		sub := leaf(ic.use, ic.short)
		sub.Long = strings.TrimSpace(ic.short + "\n\n" + ic.long)
		runImage := ic.setup(sub.Flags())
		sub.RunE = func(_ *cobra.Command, pos []string) error { return runImage(pos) }
		for _, name := range []string{"format", "second-format", "backing-format", "output-format"} {
			if sub.Flags().Lookup(name) != nil {
				fixedChoices(sub, name, imageFormats...)
			}
		}
		c.AddCommand(sub)
	}
	check, _, _ := c.Find([]string{"check"})
	runCheck := check.RunE
	check.RunE = func(cc *cobra.Command, pos []string) error { return checkUsageError(cc, runCheck(cc, pos)) }
	check.SetFlagErrorFunc(func(cc *cobra.Command, err error) error { return checkUsageError(cc, usagef("%v", err)) })
	return c
}

// checkUsageError reports a mistyped check command line with status 1:
// check's 2 means a corrupt image, as in qemu-img.
func checkUsageError(c *cobra.Command, err error) error {
	var ue *usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(os.Stderr, "blktap image check: %s\nusage: %s\n", ue.msg, c.UseLine())
		return exitCode(1)
	}
	return err
}

// applyOpts sets what -o names on co, as format takes it; a key or value
// we do not honour is refused naming the valid ones.
func applyOpts(format string, co *formats.CreateOptions, opts map[string]string) error {
	keys := make([]string, 0, len(opts))
	for k := range opts {
		keys = append(keys, k)
	}
	sort.Strings(keys) // the first error is the same on every run
	for _, k := range keys {
		if err := formats.ApplyCreateOption(format, co, k, opts[k]); err != nil {
			return usagef("%v", err)
		}
	}
	return nil
}

// optsHelp handles qemu-img's -o help (or -o ?): the keys format takes.
func optsHelp(format, opt string) (bool, error) {
	if opt != "help" && opt != "?" {
		return false, nil
	}
	text, err := formats.CreateOptionsHelp(format)
	if err != nil {
		return true, usagef("%v", err)
	}
	fmt.Print(text)
	return true, nil
}

// outputFormat is the common start of create and convert: the output format,
// then -o help (answered before the operands are checked, so that it works
// alone, as in qemu-img), then the operands, then the -o pairs. done says
// -o help was answered and there is nothing more to do.
func outputFormat(fmtName, optStr string, operandsOK bool, want string) (string, map[string]string, bool, error) {
	format, err := formats.Normalize(fmtName)
	if err != nil {
		return "", nil, false, usagef("%v", err)
	}
	if done, err := optsHelp(format, optStr); done {
		return "", nil, true, err
	}
	if !operandsOK {
		return "", nil, false, usagef("%s", want)
	}
	opts, err := parseOpts(optStr)
	if err != nil {
		return "", nil, false, err
	}
	return format, opts, false, nil
}

// parseOpts reads qemu-img style -o key=value,key=value.
func parseOpts(s string) (map[string]string, error) {
	m := map[string]string{}
	if s == "" {
		return m, nil
	}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, usagef("-o %q: want key=value (-o help lists the keys)", kv)
		}
		if _, dup := m[k]; dup {
			return nil, usagef("-o: %s given twice", k)
		}
		m[k] = v
	}
	return m, nil
}

func imageCreate(fs *pflag.FlagSet) func(pos []string) error {
	fmtName := fs.StringP("format", "f", "raw", "the image's `FMT`: raw, qcow, qcow2, vhd, vmdk")
	backing := fs.StringP("backing", "b", "", "the `BACKING` file (copy-on-write)")
	bfmt := fs.StringP("backing-format", "F", "", "the backing file's format, `BFMT`")
	optStr := fs.StringP("options", "o", "", "`OPTIONS` key=value,... as qemu-img's (-o help lists them)")
	return func(pos []string) error {
		format, opts, done, err := outputFormat(*fmtName, *optStr, len(pos) >= 1 && len(pos) <= 2, "want FILE SIZE")
		if done || err != nil {
			return err
		}
		co := formats.CreateOptions{}
		if err := applyOpts(format, &co, opts); err != nil {
			return err
		}
		// -b and -F win over -o backing_file= and backing_fmt=, as in qemu-img.
		if *backing != "" {
			co.Backing = *backing
		}
		if *bfmt != "" {
			co.BackingFormat = *bfmt
		}
		if len(pos) == 2 {
			if co.Size, err = formats.ParseSize(pos[1]); err != nil {
				return usagef("SIZE: %v", err)
			}
		} else if co.Size == 0 && co.Backing == "" {
			return usagef("want SIZE (or -o size=, or -b BACKING to take its size)")
		}
		if co.Backing != "" && co.Size == 0 {
			b, err := openProbed(formats.PathCombine(pos[0], co.Backing), co.BackingFormat, true)
			if err != nil {
				return fmt.Errorf("backing file: %w", err)
			}
			co.Size = b.Size()
			b.Close()
		}
		if err := formats.Create(format, pos[0], co); err != nil {
			return err
		}
		fmt.Printf("Formatting '%s', fmt=%s size=%d", pos[0], format, co.Size)
		if co.Backing != "" {
			fmt.Printf(" backing_file=%s", co.Backing)
			if co.BackingFormat != "" {
				fmt.Printf(" backing_fmt=%s", co.BackingFormat)
			}
		}
		fmt.Println()
		return nil
	}
}

// openProbed opens an image, probing its format when none is given, with
// backing files confined to the image's own directory tree.
// formatOrProbe is the format the user named, or else the one the file's
// contents say.
func formatOrProbe(format, path string) (string, error) {
	if format != "" {
		return format, nil
	}
	return formats.Probe(path)
}

func openProbed(path, format string, readOnly bool) (formats.Image, error) {
	format, err := formatOrProbe(format, path)
	if err != nil {
		return nil, err
	}
	if format, err = formats.Normalize(format); err != nil {
		return nil, err
	}
	return formats.Open(format, path, formats.Options{
		ReadOnly: readOnly,
		Backing:  worker.BackingOpener(path, []string{"/"}, 0),
	})
}

func imageInfo(fs *pflag.FlagSet) func(pos []string) error {
	out := addOutputFlag(fs)
	fmtName := fs.StringP("format", "f", "", "the image's `FMT` (default: probe)")
	chain := fs.Bool("backing-chain", false, "also describe every backing file, top first")
	detail := fs.Bool("detail", false, "print blktap's own view of each image's metadata (JSON) after qemu-img's")
	return func(pos []string) error {
		asJSON, err := out.isJSONForFile(pos)
		if err != nil {
			return err
		}
		var infos []*qemuInfo
		path, format := pos[0], *fmtName
		for depth := 0; ; depth++ {
			info, backingFmt, err := describeImage(path, format)
			if err != nil {
				return err
			}
			infos = append(infos, info)
			if !*chain || info.BackingFilename == "" {
				break
			}
			if depth >= 16 {
				return fmt.Errorf("backing chain deeper than 16")
			}
			path, format = info.FullBackingFilename, backingFmt
		}
		if *detail {
			// qemu-img's shape has no room for what only we read (a VHD's
			// footer, a VMDK's extents, qcow2 feature bits), so it comes apart.
			defer func() {
				for _, in := range infos {
					if img, err := openProbed(in.Filename, in.ourFormat, true); err == nil {
						writeQemuJSON(os.Stdout, formats.Describe(img))
						img.Close()
					}
				}
			}()
		}
		if asJSON {
			if *chain {
				return writeQemuJSON(os.Stdout, infos)
			}
			return writeQemuJSON(os.Stdout, infos[0])
		}
		for i, info := range infos {
			if i > 0 {
				fmt.Println()
			}
			if err := printInfoHuman(os.Stdout, info); err != nil {
				return err
			}
		}
		return nil
	}
}

// describeImage is what `image info` says of one image, and the format of
// its backing file if the image names one.
func describeImage(path, format string) (*qemuInfo, string, error) {
	var err error
	if format == "" {
		if format, err = formats.Probe(path); err != nil {
			return nil, "", err
		}
	}
	img, err := openProbed(path, format, true)
	if err != nil {
		return nil, "", err
	}
	defer img.Close()
	d := formats.DescribeQemu(img, path)
	var used *int64
	if formats.IsFile(format) {
		st, err := os.Stat(path)
		if err != nil {
			return nil, "", err
		}
		n := diskUsage(st)
		for _, f := range d.ExtentFiles {
			if st, err := os.Stat(f); err == nil {
				n += diskUsage(st)
			}
		}
		used = &n
	}
	info := &qemuInfo{
		Filename:       path,
		Format:         formats.QemuName(format),
		ourFormat:      format,
		VirtualSize:    img.Size(),
		ActualSize:     used,
		ClusterSize:    d.ClusterSize,
		DirtyFlag:      d.Dirty,
		Snapshots:      d.Snapshots,
		FormatSpecific: d.Specific,
	}
	var backingFmt string
	if b, ok := img.(interface{ BackingFile() (string, string) }); ok {
		var backing string
		backing, backingFmt = b.BackingFile()
		if backing != "" {
			info.BackingFilename = backing
			info.FullBackingFilename = formats.PathCombine(path, backing)
			info.BackingFilenameFormat = backingFmt
		}
	}
	return info, backingFmt, nil
}

func imageCheck(fs *pflag.FlagSet) func(pos []string) error {
	out := addOutputFlag(fs)
	fmtName := fs.StringP("format", "f", "", "the image's `FMT` (default: probe)")
	repairFlag := fs.StringP("repair-level", "r", "", "repair `leaks|all`: leaks (only leaks; on a qcow2 marked corrupt, refcounts and copied flags too) or all (leaks and what else can be fixed)")
	repairOld := fs.Bool("repair", false, "same as -r leaks")
	return func(pos []string) error {
		asJSON, err := out.isJSONForFile(pos)
		if err != nil {
			return err
		}
		repair := formats.RepairNone
		switch *repairFlag {
		case "":
			if *repairOld {
				repair = formats.RepairLeaks
			}
		case "leaks":
			repair = formats.RepairLeaks
		case "all":
			repair = formats.RepairAll
		default:
			return usagef("-r %q: want leaks or all", *repairFlag)
		}
		format, err := formatOrProbe(*fmtName, pos[0])
		if err != nil {
			return err
		}
		res, err := formats.Check(format, pos[0], repair, worker.BackingOpener(pos[0], []string{"/"}, 0))
		if err != nil {
			// qemu-img's status 1: the check itself failed, which says
			// nothing either way about the image.
			return err
		}
		// Problems go to stderr, as qemu's drivers print theirs, so stdout
		// holds only the summary (or the JSON).
		for _, p := range res.Problems {
			fmt.Fprintln(os.Stderr, p)
		}
		c := &qemuCheck{
			Filename: pos[0], Format: formats.QemuName(format),
			ImageEndOffset: res.ImageEndOffset,
			Corruptions:    int64(res.Corruptions), Leaks: int64(res.Leaks),
			CorruptionsFixed: int64(res.CorruptionsFixed), LeaksFixed: int64(res.LeaksFixed),
			TotalClusters: res.TotalClusters, AllocatedClusters: res.AllocatedClusters,
			FragmentedClusters: res.FragmentedClusters, CompressedClusters: res.CompressedClusters,
		}
		if asJSON {
			if err := writeQemuJSON(os.Stdout, c); err != nil {
				return err
			}
		} else {
			printCheckHuman(os.Stdout, c)
		}
		return checkExit(c)
	}
}

func imageMap(fs *pflag.FlagSet) func(pos []string) error {
	out := addOutputFlag(fs)
	fmtName := fs.StringP("format", "f", "", "the image's `FMT` (default: probe)")
	return func(pos []string) error {
		asJSON, err := out.isJSONForFile(pos)
		if err != nil {
			return err
		}
		format, err := formatOrProbe(*fmtName, pos[0])
		if err != nil {
			return err
		}
		img, err := openProbed(pos[0], format, true)
		if err != nil {
			return err
		}
		defer img.Close()
		rows, err := qemuMap(img, pos[0])
		if err != nil {
			return err
		}
		if asJSON {
			writeMapJSON(os.Stdout, rows)
			return nil
		}
		return writeMapHuman(os.Stdout, rows)
	}
}

// qemuMap lists the image's runs as qemu-img map does.
func qemuMap(img formats.Image, path string) ([]formats.QemuExtent, error) {
	var rows []formats.QemuExtent
	const chunk = 1 << 30
	for off := int64(0); off < img.Size(); off += chunk {
		exts, err := formats.MapQemu(img, path, off, min(chunk, img.Size()-off))
		if err != nil {
			return nil, err
		}
		for _, r := range exts {
			if l := len(rows); l > 0 && mergeable(&rows[l-1], &r) {
				rows[l-1].Length += r.Length
				continue
			}
			rows = append(rows, r)
		}
	}
	return rows, nil
}

func imageConvert(fs *pflag.FlagSet) func(pos []string) error {
	progress := fs.BoolP("progress", "p", false, "show progress")
	compress := fs.BoolP("compress", "c", false, "compress data clusters (qcow2 output)")
	inFmt := fs.StringP("format", "f", "", "the input's `FMT` (default: probe)")
	outFmt := fs.StringP("output-format", "O", "raw", "the output's `FMT`")
	optStr := fs.StringP("options", "o", "", "the output's `OPTIONS` key=value,... as qemu-img's (-o help lists them)")
	return func(pos []string) error {
		of, opts, done, err := outputFormat(*outFmt, *optStr, len(pos) == 2, "want IN OUT")
		if done || err != nil {
			return err
		}
		in, err := openProbed(pos[0], *inFmt, true)
		if err != nil {
			return err
		}
		defer in.Close()
		co := formats.CreateOptions{}
		if err := applyOpts(of, &co, opts); err != nil {
			return err
		}
		if co.Size == 0 {
			co.Size = in.Size()
		}
		// qemu-img's habit: progress with -p; we also show it on a terminal.
		var pr io.Writer
		if *progress || isTerminal(os.Stderr) {
			pr = os.Stderr
		}
		return formats.ConvertWith(context.Background(), in, of, pos[1], co,
			formats.ConvertOptions{Progress: progressFunc(pr), Compress: *compress})
	}
}

func progressFunc(w io.Writer) func(done, total int64) {
	if w == nil {
		return nil
	}
	last := time.Time{}
	return func(done, total int64) {
		if time.Since(last) < 200*time.Millisecond && done < total {
			return
		}
		last = time.Now()
		pct := 100.0
		if total > 0 {
			pct = float64(done) * 100 / float64(total)
		}
		fmt.Fprintf(w, "\r    (%6.2f/100%%)", pct)
		if done >= total {
			fmt.Fprintln(w)
		}
	}
}

// diskUsage is the space a file takes on disk (st_blocks), not its length.
func diskUsage(st os.FileInfo) int64 {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return s.Blocks * 512
	}
	return st.Size()
}
