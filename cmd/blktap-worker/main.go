// Command blktap-worker is one disk's worker process: the image, its
// guest's blkif ring and its dom0 NBD export. `blktap run` starts one per
// disk, with its control socket on descriptor 3 (and, with --adopt, the
// socket a restarted daemon adopts it on, descriptor 4); it is not meant
// to be run by hand.
//
// It is tapengine/worker and the image formats, nothing more: no command
// tree, no metrics, no YAML. That is the point of a second binary: every
// idle disk pays for its worker's private memory, and the package
// initialisers and command tree of the full blktap cost each worker about
// 0.7 MiB (docs/PERFORMANCE.md, "Memory"). blktap still serves as its
// own worker (`blktap __worker`) when this binary is missing or is not
// the one it was built with (cmd/blktap/workerexe.go).

// No per-second re-read of the CPU limit (see cmd/blktap/main.go).
//
//go:debug updatemaxprocs=0
package main

import (
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/blktap-go/blktap/internal/logsetup"
	"github.com/blktap-go/blktap/internal/maxprocs"
	"github.com/blktap-go/blktap/tapengine/worker"
)

const usage = "usage: blktap-worker [__worker] --name NAME [--adopt] (started by blktap run)"

func main() {
	name, adopt, err := parseArgs(os.Args[1:])
	if err != nil {
		fmt.Fprintf(os.Stderr, "blktap-worker: %v\n%s\n", err, usage)
		os.Exit(2)
	}
	// As in `blktap __worker`: the daemon closes each disk in order on
	// SIGTERM; a signal that reaches the worker directly (a process-group
	// kill) means the same.
	signal.Ignore(syscall.SIGINT, syscall.SIGHUP)
	log := logsetup.New().With("worker", name, "pid", os.Getpid())
	maxprocs.AtLeastTwo()
	os.Exit(worker.Main(log, adopt))
}

// parseArgs takes the command line `blktap __worker` takes, with or
// without the leading __worker, so the daemon starts either binary with
// the same arguments.
func parseArgs(args []string) (name string, adopt bool, err error) {
	if len(args) > 0 && args[0] == "__worker" {
		args = args[1:]
	}
	for i := 0; i < len(args); i++ {
		switch a := args[i]; {
		case a == "--adopt":
			adopt = true
		case a == "--name" && i+1 < len(args):
			i++
			name = args[i]
		case strings.HasPrefix(a, "--name="):
			name = strings.TrimPrefix(a, "--name=")
		default:
			return "", false, fmt.Errorf("unexpected argument %q", a)
		}
	}
	if name == "" {
		return "", false, fmt.Errorf("--name is required")
	}
	return name, adopt, nil
}
