package main

import (
	"errors"
	"fmt"
	"os"
	"regexp"
	"strings"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/tapengine/worker"
	"github.com/spf13/pflag"
)

// The messages qemu-img 7.2 prints for a shrink without --shrink.
const (
	shrinkRefused = "Use the --shrink option to perform a shrink operation."
	shrinkWarning = "warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there."
)

func imageResize(fs *pflag.FlagSet) func(pos []string) error {
	fmtName := fs.StringP("format", "f", "", "the image's `FMT` (default: probe): raw, qcow2 or vhd")
	shrink := fs.Bool("shrink", false, "allow a smaller size (the data past it is lost)")
	prealloc := fs.String("preallocation", "off", "`MODE` of the new space: only off")
	quiet := fs.BoolP("quiet", "q", false, "print nothing on success")
	return func(pos []string) error {
		if len(pos) != 2 {
			return usagef("want FILE [+|-]SIZE")
		}
		if *prealloc != "off" {
			return usagef("--preallocation=%s is not supported; valid: off", *prealloc)
		}
		sign, n, err := parseRelSize(pos[1])
		if err != nil {
			return usagef("SIZE: %v", err)
		}
		format, err := formatOrProbe(*fmtName, pos[0])
		if err != nil {
			return err
		}
		err = formats.Resize(format, pos[0], worker.BackingOpener(pos[0], []string{"/"}, 0), func(cur int64) (int64, error) {
			size := n
			if sign != 0 {
				size = cur + sign*n
			}
			switch {
			case size <= 0:
				return 0, errors.New("New image size must be positive")
			case size < cur && !*shrink:
				return 0, errShrinkRefused
			}
			return size, nil
		})
		switch {
		case errors.Is(err, errShrinkRefused):
			fmt.Fprintf(os.Stderr, "blktap: %s\nblktap: %s\n", shrinkRefused, shrinkWarning)
			return exitCode(1)
		case errors.Is(err, formats.ErrLocked):
			return fmt.Errorf("%s is in use (a blktap worker or qemu has it open): %w", pos[0], err)
		case err != nil:
			return err
		}
		if !*quiet {
			fmt.Println("Image resized.")
		}
		return nil
	}
}

var errShrinkRefused = errors.New(shrinkRefused)

// parseRelSize reads qemu-img resize's [+|-]SIZE: sign is 0 for an
// absolute size, else +1 or -1.
func parseRelSize(s string) (sign, n int64, err error) {
	switch {
	case strings.HasPrefix(s, "+"):
		sign, s = 1, s[1:]
	case strings.HasPrefix(s, "-"):
		sign, s = -1, s[1:]
	}
	n, err = formats.ParseSize(s)
	return sign, n, err
}

var negativeSize = regexp.MustCompile(`^-[0-9]`)

// resizeArgs lets `image resize FILE -1G` through as qemu-img does: a
// size starting with '-' would read as flags, so "--" goes before it.
func resizeArgs(args []string) []string {
	var words []string
	for _, a := range args {
		if a == "--" {
			return args
		}
		if !strings.HasPrefix(a, "-") {
			words = append(words, a)
		}
	}
	// Global flags may come first: `--state-dir D image resize F -1G`.
	isResize := false
	for i := 0; i+1 < len(words); i++ {
		isResize = isResize || words[i] == "image" && words[i+1] == "resize"
	}
	if !isResize || !negativeSize.MatchString(args[len(args)-1]) {
		return args
	}
	out := append([]string(nil), args[:len(args)-1]...)
	return append(out, "--", args[len(args)-1])
}
