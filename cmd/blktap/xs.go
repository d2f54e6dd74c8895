package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"

	"github.com/blktap-go/blktap/xenstore"
)

const xenstoreUsage = `blktap xenstore read PATH...
blktap xenstore write PATH VALUE [PATH VALUE]...
blktap xenstore ls [PATH]          (recursive, like xenstore-ls)
blktap xenstore rm PATH...
blktap xenstore mkdir PATH...
blktap xenstore exists PATH        (exit 0 if it exists, 1 if not)
blktap xenstore chmod PATH PERM... (PERM: letter n|r|w|b and a domid, e.g. n0 r1; the first is the owner)
blktap xenstore watch PATH         (prints "PATH TOKEN" per event until interrupted)
flags: --state-dir DIR, --xenstore SOCKET`

func cmdXenstore(args []string) error {
	fs := flag.NewFlagSet("xenstore", flag.ContinueOnError)
	stateDir, xsPath := stateFlags(fs)
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) == 0 {
		return usagef("want a subcommand\n%s", xenstoreUsage)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	sub, rest := pos[0], pos[1:]
	switch sub {
	case "read", "write", "ls", "rm", "watch", "mkdir", "exists", "chmod":
	default:
		return usagef("unknown subcommand %q\n%s", sub, xenstoreUsage)
	}
	xs, err := dialXenstore(ctx, *stateDir, *xsPath)
	if err != nil {
		return err
	}
	defer xs.Close()
	switch sub {
	case "read":
		if len(rest) == 0 {
			return usagef("read wants PATH")
		}
		for _, p := range rest {
			v, err := xs.Read(ctx, p)
			if err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
			fmt.Println(v)
		}
	case "write":
		if len(rest) == 0 || len(rest)%2 != 0 {
			return usagef("write wants PATH VALUE pairs")
		}
		for i := 0; i < len(rest); i += 2 {
			if err := xs.Write(ctx, rest[i], rest[i+1]); err != nil {
				return fmt.Errorf("%s: %w", rest[i], err)
			}
		}
	case "rm":
		if len(rest) == 0 {
			return usagef("rm wants PATH")
		}
		for _, p := range rest {
			if err := xs.Rm(ctx, p); err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
		}
	case "mkdir":
		if len(rest) == 0 {
			return usagef("mkdir wants PATH")
		}
		for _, p := range rest {
			if err := xs.Mkdir(ctx, p); err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
		}
	case "exists":
		if len(rest) != 1 {
			return usagef("exists wants PATH")
		}
		ok, err := xs.Exists(ctx, rest[0])
		if err != nil {
			return err
		}
		if !ok {
			return errSilentFailure
		}
	case "chmod":
		if len(rest) < 2 {
			return usagef("chmod wants PATH PERM...")
		}
		var perms []xenstore.Perm
		for _, s := range rest[1:] {
			p, err := xenstore.ParsePerm(s)
			if err != nil {
				return usagef("%v", err)
			}
			perms = append(perms, p)
		}
		if err := xs.SetPerms(ctx, rest[0], perms); err != nil {
			return fmt.Errorf("%s: %w", rest[0], err)
		}
	case "ls":
		root := "/"
		if len(rest) > 1 {
			return usagef("ls wants at most one PATH")
		}
		if len(rest) == 1 {
			root = rest[0]
		}
		return xsList(ctx, xs, root, 0)
	case "watch":
		if len(rest) != 1 {
			return usagef("watch wants PATH")
		}
		w, err := xs.Watch(ctx, rest[0], "blktap-cli")
		if err != nil {
			return err
		}
		defer w.Close()
		for {
			select {
			case <-ctx.Done():
				return nil
			case ev, ok := <-w.Events():
				if !ok {
					return fmt.Errorf("xenstore connection lost")
				}
				if ev.Overflow {
					fmt.Println("# events lost: re-read the tree")
					continue
				}
				fmt.Println(ev.Path, ev.Token)
			}
		}
	}
	return nil
}

func xsList(ctx context.Context, xs *xenstore.Client, p string, depth int) error {
	kids, err := xs.Directory(ctx, p)
	if err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	sort.Strings(kids)
	for _, k := range kids {
		child := strings.TrimSuffix(p, "/") + "/" + k
		v, err := xs.Read(ctx, child)
		if err != nil {
			v = ""
		}
		fmt.Fprintf(os.Stdout, "%s%s = %q\n", strings.Repeat(" ", depth), k, v)
		if err := xsList(ctx, xs, child, depth+1); err != nil {
			return err
		}
	}
	return nil
}
