package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/formats/qcow"
	"github.com/blktap-go/blktap/tapengine/worker"
	"golang.org/x/sys/unix"
)

// seedUsage is a usage error that prints the 2006 tool's own usage text.
type seedUsage struct{ text string }

func (e *seedUsage) Error() string { return e.text }

// seedTool runs the 2006 tools, with their usage texts.
func seedTool(name string, args []string) error {
	ctx := context.Background()
	switch name {
	case "qcow-create":
		reserve := false
		if len(args) > 0 && args[0] == "-r" {
			reserve, args = true, args[1:]
		}
		if len(args) < 2 || len(args) > 3 {
			return &seedUsage{qcow.QcowCreateUsage}
		}
		size, err := strconv.ParseInt(args[0], 10, 64)
		if err != nil || size <= 0 {
			return fmt.Errorf("SIZE_MB %q: want a positive number of megabytes\n%s", args[0], qcow.QcowCreateUsage)
		}
		backing := ""
		if len(args) == 3 {
			backing = args[2]
		}
		return qcow.QcowCreate(size, args[1], backing, reserve)
	case "img2qcow":
		if len(args) != 2 {
			return &seedUsage{qcow.Img2QcowUsage}
		}
		// The 2006 tool read a raw image file or partition.
		src, err := formats.Open("raw", args[1], formats.Options{ReadOnly: true})
		if err != nil {
			return err
		}
		defer src.Close()
		return qcow.Img2Qcow(ctx, args[0], src)
	case "qcow2raw":
		if len(args) != 2 {
			return &seedUsage{qcow.Qcow2RawUsage}
		}
		overwrite := false
		if st, err := os.Stat(args[0]); err == nil && st.Mode().IsRegular() {
			// The 2006 tool asked before overwriting; without a terminal
			// to ask on, the answer is no.
			if !isTerminal(os.Stdin) {
				return fmt.Errorf("%s exists; not overwriting it (run on a terminal to be asked)", args[0])
			}
			fmt.Fprintf(os.Stderr, "File %s exists, overwrite? (y/n): ", args[0])
			line, _ := bufio.NewReader(os.Stdin).ReadString('\n')
			if a := strings.TrimSpace(strings.ToLower(line)); a != "y" && a != "yes" {
				return fmt.Errorf("not overwriting %s", args[0])
			}
			overwrite = true
		}
		return qcow.Qcow2RawWith(ctx, args[0], args[1], qcow.Qcow2RawOptions{
			Open:      qcow.Options{ReadOnly: true, Backing: worker.BackingOpener(args[1], []string{"/"}, 0)},
			Overwrite: overwrite,
		})
	}
	return fmt.Errorf("unknown tool %s", name)
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
