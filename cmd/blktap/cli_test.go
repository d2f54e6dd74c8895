package main

import (
	"bytes"
	"errors"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// Long flags written with one dash, as Go's flag package took them, reach
// pflag with two; one-letter flags, values and anything after "--" do not
// change.
func TestTwoDashLongFlags(t *testing.T) {
	for _, c := range []struct{ in, want []string }{
		{[]string{"-state-dir", "/s", "ls"}, []string{"--state-dir", "/s", "ls"}},
		{[]string{"-state-dir=/s", "ls", "-json"}, []string{"--state-dir=/s", "ls", "--json"}},
		{[]string{"-version"}, []string{"--version"}},
		{[]string{"ls", "-o", "wide"}, []string{"ls", "-o", "wide"}},
		{[]string{"image", "convert", "-cp", "-O", "qcow2", "a", "b"}, []string{"image", "convert", "-cp", "-O", "qcow2", "a", "b"}},
		{[]string{"image", "create", "-nosuchflag", "f"}, []string{"image", "create", "-nosuchflag", "f"}},
		{[]string{"pause", "--", "-json", "x"}, []string{"pause", "--", "-json", "x"}},
	} {
		if got := twoDashLongFlags(newRoot(), c.in); !slices.Equal(got, c.want) {
			t.Errorf("%q: %q, want %q", c.in, got, c.want)
		}
	}
}

// The global flags are taken before and after the command, and checked
// either way.
func TestGlobalFlagsAnywhere(t *testing.T) {
	t.Setenv("BLKTAP_LOG_LEVEL", "")
	t.Setenv("BLKTAP_LOG_FORMAT", "")
	for _, args := range [][]string{
		{"--log-level", "loud", "version"},
		{"version", "--log-level=loud"},
		{"--log-format", "xml", "version"},
		{"version", "-log-format", "xml"},
		{"--state-dir=", "version"},
	} {
		var ue *usageError
		if err := execute(args); !errors.As(err, &ue) {
			t.Errorf("%q: %v, want a usage error", args, err)
		}
	}
	if err := execute([]string{"version", "--log-level", "debug", "--log-format", "json"}); err != nil {
		t.Fatal(err)
	}
	if os.Getenv("BLKTAP_LOG_LEVEL") != "debug" || os.Getenv("BLKTAP_LOG_FORMAT") != "json" {
		t.Errorf("after the command: level %q, format %q; want debug, json", os.Getenv("BLKTAP_LOG_LEVEL"), os.Getenv("BLKTAP_LOG_FORMAT"))
	}
	// The last --state-dir wins, wherever it stands.
	root := newRoot()
	root.SetArgs([]string{"--state-dir", "/first", "version", "--state-dir", "/last"})
	if err := root.Execute(); err != nil || defaultStateDir() != "/last" {
		t.Errorf("state dir %q (%v), want /last", defaultStateDir(), err)
	}
	newRoot() // forget it again
}

// A word that is no command, at either level, is a usage error.
func TestUnknownCommand(t *testing.T) {
	for _, args := range [][]string{{"bogus"}, {"image"}, {"image", "bogus"}, {"ls", "--bogus"}} {
		var ue *usageError
		if err := execute(args); !errors.As(err, &ue) {
			t.Errorf("%q: %v, want a usage error", args, err)
		}
	}
}

// Every command's --help starts with its synopsis: the command path and
// its positionals and flags, never a bare "[flags]".
func TestEveryHelpHasSynopsis(t *testing.T) {
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		for _, sub := range c.Commands() {
			walk(sub)
		}
		if c.Hidden || !c.HasParent() {
			return
		}
		var out bytes.Buffer
		root := c.Root()
		root.SetOut(&out)
		root.SetArgs(append(strings.Fields(c.CommandPath())[1:], "--help"))
		if err := root.Execute(); err != nil {
			t.Errorf("%s --help: %v", c.CommandPath(), err)
			return
		}
		first, _, _ := strings.Cut(out.String(), "\n")
		if first != "usage: "+c.UseLine() || strings.Contains(first, "[flags]") {
			t.Errorf("%s --help starts %q", c.CommandPath(), first)
		}
		if c.Name() != "version" && c.Parent().Name() != "completion" && c.UseLine() == c.CommandPath() {
			t.Errorf("%s: the synopsis names no arguments", c.CommandPath())
		}
	}
	walk(newRoot())
}
