package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/tapengine/worker"
)

const imageUsage = `blktap image create -f FMT [-b BACKING [-F BFMT]] [-o cluster_size=N,subformat=S] FILE SIZE
blktap image info [--json] [-f FMT] FILE
blktap image check [--json] [-f FMT] FILE
blktap image map [--json] [-f FMT] FILE
blktap image convert [-p] [-c] [-f FMT] -O FMT [-o subformat=S] IN OUT
formats: ` + "raw (alias aio), qcow, qcow2, vhd (alias vpc), vmdk" + `
SIZE takes K, M, G, T suffixes (powers of 1024).`

func cmdImage(args []string) error {
	if len(args) == 0 {
		return usagef("want a subcommand\n%s", imageUsage)
	}
	switch args[0] {
	case "create":
		return imageCreate(args[1:])
	case "info":
		return imageInfo(args[1:])
	case "map":
		return imageMap(args[1:])
	case "check":
		return imageCheck(args[1:])
	case "convert":
		return imageConvert(args[1:])
	case "help", "-h", "--help":
		fmt.Println(imageUsage)
		return nil
	}
	return usagef("unknown subcommand %q\n%s", args[0], imageUsage)
}

// applyOpts sets what -o names on co: cluster_size (block_size for VHD)
// and subformat.
func applyOpts(co *formats.CreateOptions, opts map[string]string) error {
	for k, v := range opts {
		switch k {
		case "cluster_size", "block_size":
			n, err := formats.ParseSize(v)
			if err != nil {
				return usagef("%s: %v", k, err)
			}
			co.ClusterSize = n
		case "subformat":
			co.Subformat = v
		default:
			return usagef("unknown option %q for -o", k)
		}
	}
	return nil
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
			return nil, usagef("-o %q: want key=value", kv)
		}
		m[k] = v
	}
	return m, nil
}

func imageCreate(args []string) error {
	fs := flag.NewFlagSet("image create", flag.ContinueOnError)
	fmtName := fs.String("f", "raw", "format: raw, qcow, qcow2, vhd, vmdk")
	backing := fs.String("b", "", "backing file (copy-on-write)")
	bfmt := fs.String("F", "", "backing file format")
	optStr := fs.String("o", "", "options: cluster_size=N, subformat=S")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) < 1 || len(pos) > 2 {
		return usagef("want FILE SIZE")
	}
	format, err := formats.Normalize(*fmtName)
	if err != nil {
		return usagef("%v", err)
	}
	opts, err := parseOpts(*optStr)
	if err != nil {
		return err
	}
	co := formats.CreateOptions{Backing: *backing, BackingFormat: *bfmt}
	if len(pos) == 2 {
		if co.Size, err = formats.ParseSize(pos[1]); err != nil {
			return usagef("SIZE: %v", err)
		}
	} else if *backing == "" {
		return usagef("want SIZE (or -b BACKING to take its size)")
	}
	if err := applyOpts(&co, opts); err != nil {
		return err
	}
	if *backing != "" && co.Size == 0 {
		b, err := openProbed(*backing, *bfmt, true)
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
	if *backing != "" {
		fmt.Printf(" backing_file=%s", *backing)
		if *bfmt != "" {
			fmt.Printf(" backing_fmt=%s", *bfmt)
		}
	}
	fmt.Println()
	return nil
}

// openProbed opens an image, probing its format when none is given, with
// backing files confined to the image's own directory tree.
func openProbed(path, format string, readOnly bool) (formats.Image, error) {
	var err error
	if format == "" {
		if format, err = formats.Probe(path); err != nil {
			return nil, err
		}
	}
	if format, err = formats.Normalize(format); err != nil {
		return nil, err
	}
	return formats.Open(format, path, formats.Options{
		ReadOnly: readOnly,
		Backing:  worker.BackingOpener(path, []string{"/"}, 0),
	})
}

func imageInfo(args []string) error {
	fs := flag.NewFlagSet("image info", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "JSON output")
	fmtName := fs.String("f", "", "format (default: probe)")
	chain := fs.Bool("backing-chain", false, "also describe every backing file, top first")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("want FILE")
	}
	var infos []map[string]any
	path, format := pos[0], *fmtName
	for depth := 0; ; depth++ {
		info, backing, backingFmt, err := describeImage(path, format)
		if err != nil {
			return err
		}
		infos = append(infos, info)
		if !*chain || backing == "" {
			break
		}
		if depth >= 16 {
			return fmt.Errorf("backing chain deeper than 16")
		}
		if !filepath.IsAbs(backing) {
			backing = filepath.Join(filepath.Dir(path), backing)
		}
		path, format = backing, backingFmt
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if *chain {
			return enc.Encode(infos)
		}
		return enc.Encode(infos[0])
	}
	for i, info := range infos {
		if i > 0 {
			fmt.Println()
		}
		fmt.Printf("image: %s\nfile format: %s\nvirtual size: %s (%d bytes)\ndisk size: %s\n",
			info["filename"], info["format"], formats.FormatSize(info["virtual-size"].(int64)),
			info["virtual-size"], formats.FormatSize(info["actual-size"].(int64)))
		if b, ok := info["backing-filename"]; ok {
			fmt.Printf("backing file: %s\n", b)
			if f, ok := info["backing-filename-format"]; ok {
				fmt.Printf("backing file format: %s\n", f)
			}
		}
		if fsi, ok := info["format-specific"]; ok {
			b, _ := json.MarshalIndent(fsi, "", "  ")
			fmt.Printf("format specific information: %s\n", b)
		}
	}
	return nil
}

// describeImage is what `image info` says of one image, and the backing
// file it names (as stored).
func describeImage(path, format string) (map[string]any, string, string, error) {
	var err error
	if format == "" {
		if format, err = formats.Probe(path); err != nil {
			return nil, "", "", err
		}
	}
	img, err := openProbed(path, format, true)
	if err != nil {
		return nil, "", "", err
	}
	defer img.Close()
	st, err := os.Stat(path)
	if err != nil {
		return nil, "", "", err
	}
	info := map[string]any{
		"filename":     path,
		"format":       format,
		"virtual-size": img.Size(),
		"actual-size":  diskUsage(st),
	}
	if d := formats.Describe(img); d != nil {
		info["format-specific"] = d
	}
	var backing, backingFmt string
	if b, ok := img.(interface{ BackingFile() (string, string) }); ok {
		backing, backingFmt = b.BackingFile()
		if backing != "" {
			info["backing-filename"] = backing
			if backingFmt != "" {
				info["backing-filename-format"] = backingFmt
			}
		}
	}
	return info, backing, backingFmt, nil
}

func imageCheck(args []string) error {
	fs := flag.NewFlagSet("image check", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "JSON output")
	fmtName := fs.String("f", "", "format (default: probe)")
	repair := fs.Bool("repair", false, "repair what can be repaired (leaks; on a qcow2 marked corrupt, refcounts and copied flags too)")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("want FILE")
	}
	format := *fmtName
	if format == "" {
		if format, err = formats.Probe(pos[0]); err != nil {
			return err
		}
	}
	res, err := formats.Check(format, pos[0], *repair, worker.BackingOpener(pos[0], []string{"/"}, 0))
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(res); err != nil {
			return err
		}
	} else {
		for _, p := range res.Problems {
			fmt.Println(p)
		}
		if len(res.Problems) == 0 {
			fmt.Println("No errors were found on the image.")
		}
	}
	if res.Corruptions > 0 {
		return fmt.Errorf("%d corruption(s) found", res.Corruptions)
	}
	if res.Leaks > 0 {
		return fmt.Errorf("%d leaked cluster(s) found", res.Leaks)
	}
	return nil
}

// mapEntry is one row of `image map --json`, in qemu-img map's shape.
type mapEntry struct {
	Start  int64  `json:"start"`
	Length int64  `json:"length"`
	Depth  int    `json:"depth"`
	Zero   bool   `json:"zero"`
	Data   bool   `json:"data"`
	Kind   string `json:"kind"`
}

func imageMap(args []string) error {
	fs := flag.NewFlagSet("image map", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "JSON output (qemu-img map's fields)")
	fmtName := fs.String("f", "", "format (default: probe)")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("want FILE")
	}
	img, err := openProbed(pos[0], *fmtName, true)
	if err != nil {
		return err
	}
	defer img.Close()
	var rows []mapEntry
	const chunk = 1 << 30
	for off := int64(0); off < img.Size(); off += chunk {
		n := min(chunk, img.Size()-off)
		exts, err := img.Map(off, n)
		if err != nil {
			return err
		}
		for _, e := range exts {
			r := mapEntry{Start: e.Offset, Length: e.Length, Depth: e.Depth,
				Zero: e.Kind != image.Data, Data: e.Kind == image.Data, Kind: e.Kind.String()}
			if l := len(rows); l > 0 && rows[l-1].Start+rows[l-1].Length == r.Start &&
				rows[l-1].Kind == r.Kind && rows[l-1].Depth == r.Depth {
				rows[l-1].Length += r.Length
				continue
			}
			rows = append(rows, r)
		}
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if rows == nil {
			rows = []mapEntry{}
		}
		return enc.Encode(rows)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "Offset\tLength\tKind\tDepth")
	for _, r := range rows {
		fmt.Fprintf(tw, "%#x\t%#x\t%s\t%d\n", r.Start, r.Length, r.Kind, r.Depth)
	}
	return tw.Flush()
}

func imageConvert(args []string) error {
	fs := flag.NewFlagSet("image convert", flag.ContinueOnError)
	progress := fs.Bool("p", false, "show progress")
	compress := fs.Bool("c", false, "compress data clusters (qcow2 output)")
	inFmt := fs.String("f", "", "input format (default: probe)")
	outFmt := fs.String("O", "raw", "output format")
	optStr := fs.String("o", "", "output options: cluster_size=N, subformat=S")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 2 {
		return usagef("want IN OUT")
	}
	of, err := formats.Normalize(*outFmt)
	if err != nil {
		return usagef("%v", err)
	}
	opts, err := parseOpts(*optStr)
	if err != nil {
		return err
	}
	in, err := openProbed(pos[0], *inFmt, true)
	if err != nil {
		return err
	}
	defer in.Close()
	co := formats.CreateOptions{Size: in.Size()}
	if err := applyOpts(&co, opts); err != nil {
		return err
	}
	// qemu-img's habit: progress with -p; we also show it on a terminal.
	var pr io.Writer
	if *progress || isTerminal(os.Stderr) {
		pr = os.Stderr
	}
	return formats.ConvertWith(context.Background(), in, of, pos[1], co,
		formats.ConvertOptions{Progress: progressFunc(pr), Compress: *compress})
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
