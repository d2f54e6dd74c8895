package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/tapengine/worker"
	"github.com/spf13/pflag"
)

// The commands that change which file backs an image. They live here, not
// in imageCommands' literal, so that other new image commands are added
// without touching the same lines.
func init() {
	imageCommands = append(imageCommands, []struct {
		use, short, long string
		setup            func(fs *pflag.FlagSet) func(pos []string) error
	}{
		{"rebase [-f FMT] [-F BACKING_FMT] [-u] [-p] [-q] -b BACKING FILE", "make BACKING the image's backing file, keeping what it reads",
			"Safe mode (the default) first copies into FILE every cluster it does not hold itself where the old backing chain and BACKING differ, flushes, and only then rewrites the header, so FILE reads the same before and after, and at every point of a crash. -u rewrites the name only. -b \"\" makes FILE standalone. BACKING is stored as given; a relative name is read from FILE's directory. Formats: qcow2, qcow (where the name fits before the L1 table) and VHD differencing disks (onto a VHD, where the new names fit the space of the parent locators; the parent's uuid and time are taken from it). Refused while a worker serves FILE.", imageRebase},
		{"commit [-f FMT] [-b BASE] [-d] [-p] [-q] FILE", "write the image's data into its backing file",
			"Every range FILE (and, with -b, each image between it and BASE) holds is written into BASE (default: FILE's backing file), which is flushed; then FILE is emptied, so it reads BASE through, unless -d or -b is given (-b implies -d, as in qemu-img 7.2). A VHD differencing disk is committed too (vhd-util coalesce), then emptied the same way. Refused while a worker serves FILE or BASE.", imageCommit},
	}...)
}

func imageRebase(fs *pflag.FlagSet) func(pos []string) error {
	fmtName := fs.StringP("format", "f", "", "FILE's `FMT` (default: probe)")
	backing := fs.StringP("backing", "b", "", "the new `BACKING` file (\"\": none)")
	bfmt := fs.StringP("backing-format", "F", "", "the new backing file's `BACKING_FMT` (needed with -b)")
	unsafe := fs.BoolP("unsafe", "u", false, "rewrite the name only (the content changes where the backing files differ)")
	progress := fs.BoolP("progress", "p", false, "show progress")
	quiet := fs.BoolP("quiet", "q", false, "print nothing but errors")
	return func(pos []string) error {
		if len(pos) != 1 {
			return usagef("want FILE")
		}
		if !fs.Changed("backing") && !*unsafe {
			return usagef("must specify backing file (-b) or use unsafe mode (-u)")
		}
		bf := ""
		if *backing != "" {
			if *bfmt == "" {
				return usagef("-F BACKING_FMT: the new backing file's format must be given (as qemu-img 7.2 asks)")
			}
			name, err := formats.Normalize(*bfmt)
			if err != nil {
				return usagef("%v", err)
			}
			bf = formats.QemuName(name)
		}
		path := pos[0]
		format, err := imageFormat(path, *fmtName)
		if err != nil {
			return err
		}
		lock, err := worker.LockImage(path, false)
		if err != nil {
			return err
		}
		defer lock.Close()
		opener := worker.BackingOpener(path, []string{"/"}, 0)
		if *unsafe {
			// qemu-img rebase -u never opens the old backing file (it may be
			// gone): a stand-in of no size is never read.
			opener = func(string, string) (image.Image, error) { return image.Empty{}, nil }
		}
		img, err := formats.Open(format, path, formats.Options{Backing: opener})
		if err != nil {
			return err
		}
		if err := notItself(path, *backing); err != nil {
			img.Close()
			return err
		}
		var nb formats.Image
		if *backing != "" && !*unsafe {
			if nb, err = openProbed(formats.PathCombine(path, *backing), bf, true); err != nil {
				img.Close()
				return fmt.Errorf("new backing file: %w", err)
			}
			defer nb.Close()
		}
		err = formats.Rebase(context.Background(), img, nb, *backing, bf,
			formats.RebaseOptions{Unsafe: *unsafe, Progress: progressFunc(progressTo(*progress, *quiet))})
		return errors.Join(err, img.Close())
	}
}

func imageCommit(fs *pflag.FlagSet) func(pos []string) error {
	fmtName := fs.StringP("format", "f", "", "FILE's `FMT` (default: probe)")
	baseName := fs.StringP("base", "b", "", "commit into `BASE`, an image down FILE's backing chain (default: its backing file)")
	drop := fs.BoolP("drop", "d", false, "leave FILE as it is (do not empty it)")
	progress := fs.BoolP("progress", "p", false, "show progress")
	quiet := fs.BoolP("quiet", "q", false, "print nothing but errors")
	return func(pos []string) error {
		if len(pos) != 1 {
			return usagef("want FILE")
		}
		path := pos[0]
		format, err := imageFormat(path, *fmtName)
		if err != nil {
			return err
		}
		chain, err := backingChain(path, format)
		if err != nil {
			return err
		}
		if len(chain) < 2 {
			return fmt.Errorf("%s has no backing file to commit into", path)
		}
		depth := 1
		if *baseName != "" {
			if depth, err = chainIndex(chain, *baseName); err != nil {
				return fmt.Errorf("did not find %q in the backing chain of %q: %w", *baseName, path, err)
			}
		}
		unlock, err := lockAll(chain[0].real, chain[depth].real)
		if err != nil {
			return err
		}
		defer unlock()
		var base formats.Image
		top, err := formats.Open(format, path, formats.Options{
			ReadOnly: *drop || *baseName != "",
			Backing:  commitOpener(chain[0].real, 0, chain[depth].real, &base),
		})
		if err != nil {
			return err
		}
		if base == nil {
			top.Close()
			return fmt.Errorf("commit: %s was not opened as part of %s's chain", chain[depth].real, path)
		}
		// qemu-img: "-b implies -d (so that the top image stays valid)",
		// even when BASE is the image's own backing file.
		err = formats.Commit(context.Background(), top, base, depth, !*drop && *baseName == "",
			progressFunc(progressTo(*progress, *quiet)))
		if err = errors.Join(err, top.Close()); err != nil {
			return err
		}
		if !*quiet {
			fmt.Println("Image committed.")
		}
		return nil
	}
}

func progressTo(progress, quiet bool) io.Writer {
	if progress && !quiet {
		return os.Stderr
	}
	return nil
}

// imageFormat is format normalised, or path's probed format when it is "".
func imageFormat(path, format string) (string, error) {
	if format == "" {
		return formats.Probe(path)
	}
	name, err := formats.Normalize(format)
	if err != nil {
		return "", usagef("%v", err)
	}
	return name, nil
}

// quietLog drops what a format says of the stand-in backing file
// backingChain gives it (a VHD's parent of no size, with no uuid).
var quietLog = slog.New(slog.NewTextHandler(io.Discard, nil))

// chainLayer is one image of a backing chain: its path with symlinks
// resolved, and its format.
type chainLayer struct{ real, format string }

// backingChain lists path's backing chain, top first, reading each header
// alone (no layer opens its backing file), 16 layers at most as workers
// allow.
func backingChain(path, format string) ([]chainLayer, error) {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return nil, err
	}
	chain := []chainLayer{{real, format}}
	none := func(string, string) (image.Image, error) { return image.Empty{}, nil }
	for {
		l := chain[len(chain)-1]
		img, err := formats.Open(l.format, l.real, formats.Options{ReadOnly: true, Backing: none, Logger: quietLog})
		if err != nil {
			return nil, err
		}
		name, bfmt := "", ""
		if b, ok := img.(interface{ BackingFile() (string, string) }); ok {
			name, bfmt = b.BackingFile()
		}
		img.Close()
		if name == "" {
			return chain, nil
		}
		if len(chain) >= 16 {
			return nil, fmt.Errorf("%w: backing chain of %s deeper than 16", formats.ErrUnsupported, path)
		}
		next, err := worker.ResolveBacking(l.real, name)
		if err != nil {
			return nil, err
		}
		if bfmt == "" {
			if bfmt, err = formats.Probe(next); err != nil {
				return nil, fmt.Errorf("backing file %q: %w", name, err)
			}
		}
		if bfmt, err = formats.Normalize(bfmt); err != nil {
			return nil, err
		}
		chain = append(chain, chainLayer{next, bfmt})
	}
}

// chainIndex is where name (a path from the working directory) stands in
// chain; the top itself does not count.
func chainIndex(chain []chainLayer, name string) (int, error) {
	real, err := filepath.EvalSymlinks(name)
	if err != nil {
		return 0, err
	}
	for i, l := range chain[1:] {
		if l.real == real {
			return i + 1, nil
		}
	}
	return 0, errors.New("not one of its backing files")
}

// lockAll takes the workers' exclusive lock on each path.
func lockAll(paths ...string) (func(), error) {
	var held []*os.File
	unlock := func() {
		for _, f := range held {
			f.Close()
		}
	}
	for _, p := range paths {
		f, err := worker.LockImage(p, false)
		if err != nil {
			unlock()
			return nil, err
		}
		held = append(held, f)
	}
	return unlock, nil
}

// commitOpener opens child's backing chain read-only, except target,
// which it opens for writing and leaves in *got (the chain owns it:
// closing the top closes it).
func commitOpener(child string, depth int, target string, got *formats.Image) image.OpenFunc {
	return func(name, format string) (image.Image, error) {
		if depth+1 >= 16 {
			return nil, fmt.Errorf("%w: backing chain deeper than 16", image.ErrUnsupported)
		}
		real, err := worker.ResolveBacking(child, name)
		if err != nil {
			return nil, err
		}
		if format == "" {
			if format, err = formats.Probe(real); err != nil {
				return nil, fmt.Errorf("backing file %q: %w", name, err)
			}
		}
		writable := real == target
		img, err := formats.Open(format, real, formats.Options{
			ReadOnly: !writable,
			Backing:  commitOpener(real, depth+1, target, got),
		})
		if err == nil && writable {
			*got = img
		}
		return img, err
	}
}

// notItself refuses name as the backing file of the image at path when it
// is that same file: every open of it would loop until the depth limit.
func notItself(path, name string) error {
	if name == "" {
		return nil
	}
	self, err := filepath.EvalSymlinks(path)
	if err != nil {
		return err
	}
	if real, err := worker.ResolveBacking(self, name); err == nil && real == self {
		return fmt.Errorf("%s cannot be its own backing file", path)
	}
	return nil
}
