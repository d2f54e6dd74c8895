package main

import (
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/tapengine/worker"
	"github.com/spf13/pflag"
)

// amendHelp is -o help: the keys we honour in qemu-img's layout, then
// qemu-img's keys we refuse.
const amendHelp = `Amend options for 'qcow2':
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits (only the current one)
  size=<size>            - Virtual disk size (only larger)

qemu-img amend keys not supported: backing_file, backing_fmt, data_file, data_file_raw, encrypt.*
`

func imageAmend(fs *pflag.FlagSet) func(pos []string) error {
	fmtName := fs.StringP("format", "f", "", "the image's `FMT` (default: probe): qcow2")
	optStr := fs.StringP("options", "o", "", "`OPTIONS` key=value,... to change (-o help lists them)")
	return func(pos []string) error {
		if *optStr == "help" || *optStr == "?" {
			fmt.Print(amendHelp)
			return nil
		}
		if len(pos) != 1 {
			return usagef("want FILE")
		}
		if *optStr == "" {
			return usagef("Must specify options (-o)")
		}
		kv, err := parseOpts(*optStr)
		if err != nil {
			return err
		}
		o, err := amendOptions(kv)
		if err != nil {
			return err
		}
		format, err := formatOrProbe(*fmtName, pos[0])
		if err != nil {
			return err
		}
		err = formats.Amend(format, pos[0], worker.BackingOpener(pos[0], []string{"/"}, 0), o)
		if errors.Is(err, formats.ErrLocked) {
			return fmt.Errorf("%s is in use (a blktap worker or qemu has it open): %w", pos[0], err)
		}
		return err
	}
}

// amendOptions reads -o's keys as qemu-img amend reads them for qcow2.
func amendOptions(kv map[string]string) (formats.AmendOptions, error) {
	var o formats.AmendOptions
	keys := make([]string, 0, len(kv))
	for k := range kv {
		keys = append(keys, k)
	}
	sort.Strings(keys) // the first error is the same on every run
	for _, k := range keys {
		v := kv[k]
		switch {
		case k == "compat":
			o.Compat = v
		case k == "lazy_refcounts":
			if v != "on" && v != "off" {
				return o, usagef("Parameter 'lazy_refcounts' expects 'on' or 'off'")
			}
			on := v == "on"
			o.LazyRefcounts = &on
		case k == "refcount_bits":
			n, err := strconv.Atoi(v)
			if err != nil || n <= 0 {
				return o, usagef("refcount_bits=%s: want a number of bits", v)
			}
			o.RefcountBits = n
		case k == "size":
			n, err := formats.ParseSize(v)
			if err != nil || n <= 0 {
				return o, usagef("size=%s: want a positive size", v)
			}
			o.Size = n
		case k == "backing_file" || k == "backing_fmt" || strings.HasPrefix(k, "data_file") || strings.HasPrefix(k, "encrypt."):
			return o, usagef("%s is not supported for amend; valid: compat, lazy_refcounts, refcount_bits, size", k)
		default:
			return o, usagef("Invalid parameter '%s'", k)
		}
	}
	return o, nil
}
