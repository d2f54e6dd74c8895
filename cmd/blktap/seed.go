package main

import (
	"context"
	"fmt"
	"strconv"

	"github.com/blktap-go/blktap/formats"
	"github.com/blktap-go/blktap/formats/qcow"
)

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
			return usagef("Create a QCOW image file (SIZE in MB, BACKING an existing image for copy-on-write; -r reserves all space)")
		}
		size, err := strconv.ParseInt(args[0], 10, 64)
		if err != nil || size <= 0 {
			return usagef("SIZE_MB %q: want a positive number of megabytes", args[0])
		}
		backing := ""
		if len(args) == 3 {
			backing = args[2]
		}
		return qcow.QcowCreate(size, args[1], backing, reserve)
	case "img2qcow":
		if len(args) != 2 {
			return usagef("Convert an image (file or partition) to a sparse QCOW file")
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
			return usagef("Convert a QCOW file to a raw image (sparse)")
		}
		return qcow.Qcow2Raw(ctx, args[0], args[1])
	}
	return fmt.Errorf("unknown tool %s", name)
}
