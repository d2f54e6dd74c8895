package main

//go:generate go test -run ^TestShippedDocs$ -rewrite

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
	"text/template"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

var rewrite = flag.Bool("rewrite", false, "rewrite the shipped man page, completions and README's command list from the command tree")

// The files that describe the command line are made from the command
// tree, so help, man page, completion and README cannot drift apart:
// this test fails when a shipped copy differs from what the tree makes,
// and with -rewrite (make docs) writes them.
func TestShippedDocs(t *testing.T) {
	version, date := changelogRelease(t)
	man, err := manPage(newRoot(), version, date)
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{
		"../../packaging/man/blktap.8": man,
		"../../README.md":              withReadmeCommands(t, readme, readmeCommands(newRoot())),
	}
	for path, shell := range map[string]string{
		"../../packaging/completion/blktap":      "bash",
		"../../packaging/completion/_blktap":     "zsh",
		"../../packaging/completion/blktap.fish": "fish",
	} {
		files[path] = completionScript(t, shell)
	}
	for path, want := range files {
		if *rewrite {
			if err := os.WriteFile(path, want, 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s is not what the command tree makes: run `make docs` (go generate ./cmd/blktap)", path)
		}
	}
}

// completionScript is what `blktap completion SHELL` prints (whose
// writer cobra fixes when it makes the command, so it is not run here).
func completionScript(t *testing.T, shell string) []byte {
	t.Helper()
	var out bytes.Buffer
	var err error
	switch root := newRoot(); shell {
	case "bash":
		err = root.GenBashCompletionV2(&out, true)
	case "zsh":
		err = root.GenZshCompletion(&out)
	case "fish":
		err = root.GenFishCompletion(&out, true)
	}
	if err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// changelogRelease is CHANGELOG.md's newest release and its date, which
// the man page names.
func changelogRelease(t *testing.T) (version, date string) {
	t.Helper()
	b, err := os.ReadFile("../../CHANGELOG.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^## \[([0-9][^]]*)\] - (\S+)`).FindSubmatch(b)
	if m == nil {
		t.Fatal("CHANGELOG.md names no release with a date")
	}
	return string(m[1]), string(m[2])
}

// readmeStart and readmeEnd enclose README's command list.
const (
	readmeStart = "<!-- commands: made from the command tree by `make docs` -->\n"
	readmeEnd   = "<!-- end of commands -->\n"
)

// readmeCommands is README's command list: every synopsis, with what the
// command does.
func readmeCommands(root *cobra.Command) string {
	var b strings.Builder
	b.WriteString("```\n" + rootSynopsis + "\n")
	for _, c := range synopsisCommands(root) {
		fmt.Fprintf(&b, "%s\n    %s\n", c.UseLine(), c.Short)
	}
	b.WriteString(strings.Join(seedSynopses, "\n") + "\n```\n")
	return b.String()
}

func withReadmeCommands(t *testing.T, readme []byte, list string) []byte {
	t.Helper()
	before, rest, ok := bytes.Cut(readme, []byte(readmeStart))
	_, after, ok2 := bytes.Cut(rest, []byte(readmeEnd))
	if !ok || !ok2 {
		t.Fatalf("README.md lacks the markers %q and %q", readmeStart, readmeEnd)
	}
	var out bytes.Buffer // not append(before, ...): that would write over after
	out.Write(before)
	out.WriteString(readmeStart + list + readmeEnd)
	out.Write(after)
	return out.Bytes()
}

// synopsisCommands are the commands a synopsis lists: every visible one,
// the image tools each on its own line.
func synopsisCommands(root *cobra.Command) []*cobra.Command {
	var out []*cobra.Command
	for _, c := range root.Commands() {
		if !c.IsAvailableCommand() && c.Name() != "help" {
			continue
		}
		if c.Name() == "image" {
			out = append(out, c.Commands()...)
			continue
		}
		out = append(out, c)
	}
	return out
}

// roff escapes text for a man page.
func roff(s string) string {
	s = strings.NewReplacer(`\`, `\e`, "-", `\-`).Replace(s)
	if strings.HasPrefix(s, ".") || strings.HasPrefix(s, "'") {
		s = `\&` + s
	}
	return s
}

// manPage fills packaging/man/blktap.8.in with what the tree says.
func manPage(root *cobra.Command, version, date string) ([]byte, error) {
	src, err := os.ReadFile("../../packaging/man/blktap.8.in")
	if err != nil {
		return nil, err
	}
	tmpl, err := template.New("blktap.8").Parse(string(src))
	if err != nil {
		return nil, err
	}
	var syn []string
	syn = append(syn, roff(rootSynopsis))
	for _, c := range synopsisCommands(root) {
		syn = append(syn, roff(c.UseLine()))
	}
	syn = append(syn, ".sp")
	for _, s := range seedSynopses {
		syn = append(syn, roff(s))
	}
	var out bytes.Buffer
	err = tmpl.Execute(&out, map[string]string{
		"TH":       fmt.Sprintf(`.TH BLKTAP 8 "%s" "blktap-go %s" "System Administration"`, date, version),
		"Synopsis": strings.Join(syn, "\n"),
		"Options":  manOptions(root),
	})
	return out.Bytes(), err
}

// manOptions is the OPTIONS section: the global flags, then each
// command's own.
func manOptions(root *cobra.Command) string {
	var b strings.Builder
	b.WriteString(".SH OPTIONS\nThe global options go before or after the command.\n")
	manFlags(&b, root.PersistentFlags())
	manFlags(&b, root.LocalNonPersistentFlags())
	for _, c := range synopsisCommands(root) {
		local := c.LocalNonPersistentFlags()
		n := 0
		local.VisitAll(func(f *pflag.Flag) {
			if f.Name != "help" && !f.Hidden {
				n++
			}
		})
		if n == 0 {
			continue
		}
		fmt.Fprintf(&b, ".SS %q\n", roff(c.CommandPath()))
		manFlags(&b, local)
	}
	return strings.TrimSuffix(b.String(), "\n")
}

func manFlags(b *strings.Builder, fs *pflag.FlagSet) {
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Hidden || f.Name == "help" {
			return
		}
		name := `\fB\-\-` + roff(f.Name) + `\fR`
		if f.Shorthand != "" {
			name = `\fB\-` + roff(f.Shorthand) + `\fR, ` + name
		}
		varname, usage := pflag.UnquoteUsage(f)
		if f.Value.Type() != "bool" {
			name += ` \fI` + roff(varname) + `\fR`
			if d := f.DefValue; d != "" && d != "[]" && d != "0s" {
				usage += " (default " + d + ")"
			}
		}
		fmt.Fprintf(b, ".TP\n%s\n%s\n", name, roff(usage))
	})
}
