// Package xscli implements the command lines `blktap xenstore ...` (a
// client for any xenstored) and `blktap xenstored --socket PATH` (the
// embedded server on its own). cmd/blktap only forwards its arguments:
//
//  1. Call Xenstore(ctx, args, stdout, stderr) with the arguments after
//     "xenstore", or Xenstored(ctx, args, stderr) with those after
//     "xenstored".
//  2. Cancel ctx on SIGINT/SIGTERM: watch returns, the server closes.
//  3. Exit with the returned status (0 ok, 1 failure or "does not
//     exist", 2 usage).
package xscli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"

	"github.com/blktap-go/blktap/xenstore"
)

const usage = `usage: blktap xenstore [--socket PATH] COMMAND ARGS
  read PATH...              print each value
  write PATH VALUE...       set values (pairs), creating parents
  ls [PATH]                 the tree below PATH (default /), with -p perms
  list PATH                 the names of PATH's children
  rm PATH...                remove (recursively)
  mkdir PATH...             create empty nodes
  chmod [-r] PATH PERM...   set permissions (PERM = n|r|w|b + domid, owner first)
  exists PATH               exit 0 if PATH exists, 1 if not
  watch [-n N] PATH...      print event paths (N events, or until interrupted)
The socket defaults to $XENSTORED_PATH, /run/xenstored/socket or
/var/run/xenstored/socket.
`

// Xenstore runs one client command and returns the exit status.
func Xenstore(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("xenstore", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage) }
	sock := fs.String("socket", "", "xenstored socket")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return 2
	}
	if *sock == "" {
		*sock = xenstore.DefaultPath()
	}
	cmd, rest := fs.Arg(0), fs.Args()[1:]
	c, err := xenstore.Dial(ctx, *sock)
	if err != nil {
		fmt.Fprintf(stderr, "blktap xenstore: %v\n", err)
		return 1
	}
	defer c.Close()
	err = run(ctx, c, cmd, rest, stdout)
	var ue usageError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "blktap xenstore %s: %s\n%s", cmd, ue, usage)
		return 2
	case errors.Is(err, errFalse):
		return 1
	default:
		fmt.Fprintf(stderr, "blktap xenstore %s: %v\n", cmd, err)
		return 1
	}
}

type usageError string

func (u usageError) Error() string { return string(u) }

var errFalse = errors.New("false")

// command runs one subcommand on its arguments, printing to out.
type command func(ctx context.Context, c *xenstore.Client, args []string, out io.Writer) error

var commands = map[string]command{
	"read":   cmdRead,
	"write":  cmdWrite,
	"rm":     cmdRm,
	"mkdir":  cmdMkdir,
	"exists": cmdExists,
	"list":   cmdList,
	"ls":     cmdLs,
	"chmod":  cmdChmod,
	"watch":  cmdWatch,
}

func run(ctx context.Context, c *xenstore.Client, cmd string, args []string, stdout io.Writer) error {
	f, ok := commands[cmd]
	if !ok {
		return usageError("unknown command " + strconv.Quote(cmd))
	}
	return f(ctx, c, args, stdout)
}

// need checks the argument count: at least min, and in pairs if pairs.
func need(args []string, min int, pairs bool) error {
	if len(args) < min || pairs && len(args)%2 != 0 {
		return usageError("wrong number of arguments")
	}
	return nil
}

// eachPath applies fn to every path argument, stopping at the first
// failure: there must be at least one.
func eachPath(args []string, fn func(p string) error) error {
	if err := need(args, 1, false); err != nil {
		return err
	}
	for _, p := range args {
		if err := fn(p); err != nil {
			return err
		}
	}
	return nil
}

func cmdRead(ctx context.Context, c *xenstore.Client, args []string, out io.Writer) error {
	return eachPath(args, func(p string) error {
		v, err := c.Read(ctx, p)
		if err == nil {
			fmt.Fprintln(out, v)
		}
		return err
	})
}

func cmdWrite(ctx context.Context, c *xenstore.Client, args []string, _ io.Writer) error {
	if err := need(args, 2, true); err != nil {
		return err
	}
	for i := 0; i < len(args); i += 2 {
		if err := c.Write(ctx, args[i], args[i+1]); err != nil {
			return err
		}
	}
	return nil
}

func cmdRm(ctx context.Context, c *xenstore.Client, args []string, _ io.Writer) error {
	return eachPath(args, func(p string) error { return c.Rm(ctx, p) })
}

func cmdMkdir(ctx context.Context, c *xenstore.Client, args []string, _ io.Writer) error {
	return eachPath(args, func(p string) error { return c.Mkdir(ctx, p) })
}

// cmdExists answers through the exit status only: errFalse becomes 1.
func cmdExists(ctx context.Context, c *xenstore.Client, args []string, _ io.Writer) error {
	if err := need(args, 1, false); err != nil {
		return err
	}
	ok, err := c.Exists(ctx, args[0])
	if err != nil {
		return err
	}
	if !ok {
		return errFalse
	}
	return nil
}

func cmdList(ctx context.Context, c *xenstore.Client, args []string, out io.Writer) error {
	if err := need(args, 1, false); err != nil {
		return err
	}
	names, err := c.Directory(ctx, args[0])
	if err != nil {
		return err
	}
	for _, n := range names {
		fmt.Fprintln(out, n)
	}
	return nil
}

func cmdLs(ctx context.Context, c *xenstore.Client, args []string, out io.Writer) error {
	perms := len(args) > 0 && args[0] == "-p"
	if perms {
		args = args[1:]
	}
	root := "/"
	if len(args) > 0 {
		root = args[0]
	}
	return ls(ctx, c, root, 0, perms, out)
}

func cmdChmod(ctx context.Context, c *xenstore.Client, args []string, _ io.Writer) error {
	recursive := len(args) > 0 && args[0] == "-r"
	if recursive {
		args = args[1:]
	}
	if err := need(args, 2, false); err != nil {
		return err
	}
	perms := make([]xenstore.Perm, 0, len(args)-1)
	for _, s := range args[1:] {
		p, err := xenstore.ParsePerm(s)
		if err != nil {
			return usageError(err.Error())
		}
		perms = append(perms, p)
	}
	return chmod(ctx, c, args[0], perms, recursive)
}

func cmdWatch(ctx context.Context, c *xenstore.Client, args []string, out io.Writer) error {
	n := -1
	if len(args) > 1 && args[0] == "-n" {
		v, err := strconv.Atoi(args[1])
		if err != nil || v < 1 {
			return usageError("-n wants a positive count")
		}
		n, args = v, args[2:]
	}
	if err := need(args, 1, false); err != nil {
		return err
	}
	return watch(ctx, c, args, n, out)
}

func join(dir, name string) string {
	if strings.HasSuffix(dir, "/") {
		return dir + name
	}
	return dir + "/" + name
}

// ls prints the tree the way xenstore-ls does: one node per line,
// indented one space per level.
func ls(ctx context.Context, c *xenstore.Client, dir string, depth int, perms bool, out io.Writer) error {
	names, err := c.Directory(ctx, dir)
	if err != nil {
		return err
	}
	for _, n := range names {
		p := join(dir, n)
		v, err := c.Read(ctx, p)
		if errors.Is(err, xenstore.ErrNotFound) {
			continue // removed meanwhile
		}
		if err != nil {
			return err
		}
		line := fmt.Sprintf("%s%s = %s", strings.Repeat(" ", depth), n, strconv.Quote(v))
		if perms {
			ps, err := c.GetPerms(ctx, p)
			if err != nil {
				return err
			}
			s := make([]string, len(ps))
			for i, x := range ps {
				s[i] = x.String()
			}
			line += "  (" + strings.Join(s, ",") + ")"
		}
		fmt.Fprintln(out, line)
		if err := ls(ctx, c, p, depth+1, perms, out); err != nil {
			return err
		}
	}
	return nil
}

func chmod(ctx context.Context, c *xenstore.Client, p string, perms []xenstore.Perm, recursive bool) error {
	if err := c.SetPerms(ctx, p, perms); err != nil {
		return err
	}
	if !recursive {
		return nil
	}
	names, err := c.Directory(ctx, p)
	if err != nil {
		return err
	}
	for _, n := range names {
		if err := chmod(ctx, c, join(p, n), perms, true); err != nil {
			return err
		}
	}
	return nil
}

func watch(ctx context.Context, c *xenstore.Client, paths []string, n int, out io.Writer) error {
	events := make(chan xenstore.Event)
	done := make(chan struct{})
	defer close(done)
	for i, p := range paths {
		w, err := c.Watch(ctx, p, "cli"+strconv.Itoa(i))
		if err != nil {
			return err
		}
		defer w.Close()
		go func() {
			for ev := range w.Events() {
				select {
				case events <- ev:
				case <-done:
					return
				}
			}
		}()
	}
	for seen := 0; n < 0 || seen < n; seen++ {
		select {
		case ev := <-events:
			if ev.Overflow {
				fmt.Fprintln(out, ev.Path+" (overflow: re-read)")
			} else {
				fmt.Fprintln(out, ev.Path)
			}
		case <-ctx.Done():
			return nil
		}
	}
	return nil
}

// Xenstored runs the embedded xenstored on --socket PATH until ctx ends.
func Xenstored(ctx context.Context, args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("xenstored", flag.ContinueOnError)
	fs.SetOutput(stderr)
	sock := fs.String("socket", "", "unix socket to listen on (created with mode 0600)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *sock == "" || fs.NArg() != 0 {
		fmt.Fprintln(stderr, "usage: blktap xenstored --socket PATH")
		return 2
	}
	logger := slog.New(slog.NewTextHandler(stderr, nil))
	srv := xenstore.NewServer(logger)
	errc := make(chan error, 1)
	go func() { errc <- srv.ListenAndServe(*sock) }()
	select {
	case err := <-errc:
		logger.Error("xenstored", "err", err)
		return 1
	case <-ctx.Done():
		srv.Close()
		<-errc
		return 0
	}
}
