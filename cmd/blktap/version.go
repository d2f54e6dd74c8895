package main

import (
	"fmt"
	"io"
	"runtime/debug"

	"github.com/spf13/cobra"
)

// version and commit are set by `make` (-ldflags -X main.version=...
// -X main.commit=...); left empty, they come from the build information Go
// records (the module version, vcs.revision).
var (
	version string
	commit  string
)

// versionString is `blktap --version`'s line: module path, version,
// commit (with "+dirty" for a modified tree) and the Go release.
func versionString() string {
	v, c, goVer, path := buildVersion()
	s := fmt.Sprintf("blktap %s (%s, commit %s", v, path, c)
	if goVer != "" {
		s += ", " + goVer
	}
	return s + ")"
}

// buildVersion is this binary's version, commit, Go release and module
// path, from -ldflags or else from the build information Go records.
func buildVersion() (v, c, goVer, path string) {
	v, c, dirty, path := version, commit, false, "github.com/blktap-go/blktap"
	if bi, ok := debug.ReadBuildInfo(); ok {
		goVer = bi.GoVersion
		if bi.Main.Path != "" {
			path = bi.Main.Path
		}
		if v == "" {
			v = bi.Main.Version
		}
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				if c == "" {
					c = s.Value
				}
			case "vcs.modified":
				dirty = s.Value == "true" && commit == ""
			}
		}
	}
	if v == "" {
		v = "(devel)"
	}
	if c == "" {
		c = "unknown"
	}
	if dirty {
		c += "+dirty"
	}
	return v, c, goVer, path
}

func newVersionCommand() *cobra.Command {
	c := leaf("version", "print the version and commit (also --version)")
	c.RunE = func(c *cobra.Command, args []string) error {
		if len(args) > 0 {
			return usagef("unexpected argument %q", args[0])
		}
		printVersion(c.OutOrStdout())
		return nil
	}
	return c
}

func printVersion(w io.Writer) { fmt.Fprintln(w, versionString()) }
