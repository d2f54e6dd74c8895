// Package packaging holds no Go code: its tests check the files that
// install blktap-go (the man page, the completion, the desired-state
// example, the unit, the maintainer scripts) against the binary, and build,
// install and purge the .deb in a scratch root.
package packaging

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/blktap-go/blktap/config"
	"github.com/blktap-go/blktap/internal/oracle"
)

var built struct {
	once sync.Once
	bin  string
	err  error
	dir  string
}

// TestMain removes the binary the tests share.
func TestMain(m *testing.M) {
	code := m.Run()
	if built.dir != "" {
		os.RemoveAll(built.dir)
	}
	os.Exit(code)
}

// buildBlktap builds cmd/blktap once for all the tests.
func buildBlktap(t *testing.T) string {
	t.Helper()
	built.once.Do(func() {
		if built.dir, built.err = os.MkdirTemp("", "blktap-pkg-"); built.err != nil {
			return
		}
		built.bin = filepath.Join(built.dir, "blktap")
		out, err := exec.Command("../scripts/build.sh", built.dir).CombinedOutput()
		if err != nil {
			built.err = fmt.Errorf("scripts/build.sh: %v\n%s", err, out)
		}
	})
	if built.err != nil {
		t.Fatal(built.err)
	}
	return built.bin
}

// helpCommands parses `blktap help`: name -> usage.
func helpCommands(t *testing.T, bin string) map[string]string {
	t.Helper()
	out, err := exec.Command(bin, "help").Output()
	if err != nil {
		t.Fatal(err)
	}
	cmds := map[string]string{}
	re := regexp.MustCompile(`^  ([a-z]+) *(.*)$`)
	section := string(out)[strings.Index(string(out), "commands:\n"):]
	section = section[:strings.Index(section, "\n\n")]
	for _, l := range strings.Split(section, "\n") {
		if m := re.FindStringSubmatch(l); m != nil {
			cmds[m[1]] = strings.TrimSpace(m[2])
		}
	}
	if len(cmds) < 10 {
		t.Fatalf("help lists %d commands:\n%s", len(cmds), out)
	}
	return cmds
}

// roffText undoes the escapes and fonts the man page uses.
func roffText(s string) string {
	for _, r := range [][2]string{{`\-`, "-"}, {`\fB`, ""}, {`\fR`, ""}, {`\fI`, ""}} {
		s = strings.ReplaceAll(s, r[0], r[1])
	}
	return s
}

// The man page's synopsis is the binary's, command for command: each
// command `blktap help` lists (each image tool for image) has the usage
// line its --help prints, and a paragraph. (cmd/blktap makes the page
// from the command tree; this checks the shipped page against the binary
// that is shipped with it.)
func TestManPageMatchesHelp(t *testing.T) {
	bin := buildBlktap(t)
	b, err := os.ReadFile("man/blktap.8")
	if err != nil {
		t.Fatal(err)
	}
	man := roffText(string(b))
	syn := man[strings.Index(man, ".SH SYNOPSIS"):strings.Index(man, ".SH DESCRIPTION")]
	var lines []string
	for _, l := range strings.Split(syn, "\n") {
		if strings.HasPrefix(l, "blktap ") {
			lines = append(lines, strings.TrimSpace(l))
		}
	}
	cmds := helpCommands(t, bin)
	want := 1 // blktap [global flags] COMMAND [ARGS]
	for name := range cmds {
		var tools []string
		if name == "image" {
			out, _ := exec.Command(bin, "image", "--help").Output()
			tools = regexp.MustCompile(`(?m)^  blktap image ([a-z]+) `).FindAllString(string(out), -1)
			if len(tools) < 7 {
				t.Errorf("image --help lists %d tools:\n%s", len(tools), out)
			}
		} else {
			tools = []string{"blktap " + name}
		}
		for _, tool := range tools {
			usage := helpUsage(t, bin, strings.Fields(tool)[1:]...)
			if !slices.Contains(lines, usage) {
				t.Errorf("man page synopsis lacks %q", usage)
			}
			want++
		}
		described := false
		for _, l := range strings.Split(man, "\n") {
			if strings.HasPrefix(l, ".B") && slices.Contains(strings.Fields(strings.ReplaceAll(l, `"`, " ")), name) {
				described = true
			}
		}
		if !described && name != "help" {
			t.Errorf("man page does not describe %s", name)
		}
	}
	if len(lines) != want {
		t.Errorf("man page synopsis has %d blktap lines, the binary %d commands", len(lines), want)
	}
	if !strings.Contains(man, `"blktap-go `+changelogVersion(t)+`"`) {
		t.Errorf("man page .TH does not name version %s", changelogVersion(t))
	}
}

// helpUsage is the usage line `blktap ARGS... --help` prints.
func helpUsage(t *testing.T, bin string, args ...string) string {
	t.Helper()
	out, err := exec.Command(bin, append(args, "--help")...).Output()
	if err != nil {
		t.Fatalf("%v --help: %v", args, err)
	}
	first, _, _ := strings.Cut(string(out), "\n")
	usage, ok := strings.CutPrefix(first, "usage: ")
	if !ok {
		t.Fatalf("%v --help starts %q", args, first)
	}
	return usage
}

func changelogVersion(t *testing.T) string {
	b, err := os.ReadFile("../CHANGELOG.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^## \[([0-9][^]]*)\]`).FindSubmatch(b)
	if m == nil {
		t.Fatal("CHANGELOG.md has no version")
	}
	return string(m[1])
}

// The shipped completions are the binary's own (`blktap completion
// SHELL`), which offer the commands `blktap help` lists.
func TestCompletionCommands(t *testing.T) {
	bin := buildBlktap(t)
	for shell, file := range map[string]string{"bash": "completion/blktap", "zsh": "completion/_blktap", "fish": "completion/blktap.fish"} {
		shipped, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		made, err := exec.Command(bin, "completion", shell).Output()
		if err != nil || !bytes.Equal(shipped, made) {
			t.Errorf("%s is not `blktap completion %s` (%v): run make docs", file, shell, err)
		}
	}
	// What the scripts ask the binary for when <TAB> follows "blktap ".
	out, err := exec.Command(bin, "__complete", "").Output()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, l := range strings.Split(string(out), "\n") {
		if name, _, _ := strings.Cut(l, "\t"); name != "" && !strings.HasPrefix(name, ":") {
			got = append(got, name)
		}
	}
	var want []string
	for name := range helpCommands(t, bin) {
		want = append(want, name)
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("completion offers %v, help lists %v", got, want)
	}
}

// Each shell accepts its shipped script (-n: parse only), and rejects the
// same script cut short, so the check can fail. fish also runs its script
// and asks it what follows "blktap ", as a user's <TAB> would.
func TestCompletionScriptsParse(t *testing.T) {
	bin := buildBlktap(t)
	for _, c := range []struct{ shell, file string }{
		{"bash", "completion/blktap"}, {"zsh", "completion/_blktap"}, {"fish", "completion/blktap.fish"},
	} {
		sh := oracle.Require(t, c.shell)
		b, err := os.ReadFile(c.file)
		if err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command(sh, "-n", c.file).CombinedOutput(); err != nil || len(out) > 0 {
			t.Errorf("%s -n %s: %v\n%s", c.shell, c.file, err, out)
		}
		// Cut inside the first function: its closing brace or end is lost.
		cut := filepath.Join(t.TempDir(), filepath.Base(c.file))
		os.WriteFile(cut, b[:bytes.Index(b, []byte("\n}\n"))+1], 0o644)
		if c.shell == "fish" {
			os.WriteFile(cut, b[:bytes.Index(b, []byte("\nend\n"))+1], 0o644)
		}
		if err := exec.Command(sh, "-n", cut).Run(); err == nil {
			t.Errorf("%s -n accepts %s cut short: the check cannot fail", c.shell, c.file)
		}
	}
	fish := oracle.Require(t, "fish")
	cmd := exec.Command(fish, "--no-config", "-c", `source completion/blktap.fish; complete -C"blktap "`)
	cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(bin)+":"+os.Getenv("PATH"))
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	for name := range helpCommands(t, bin) {
		if !regexp.MustCompile(`(?m)^` + name + `\t`).Match(out) {
			t.Errorf("fish completes %q without %s:\n%s", "blktap ", name, out)
		}
	}
}

// /etc/blktap/disks.yaml is a valid empty desired state, and so is its
// commented example once uncommented.
func TestDisksExample(t *testing.T) {
	b, err := os.ReadFile("disks.yaml")
	if err != nil {
		t.Fatal(err)
	}
	f, err := config.Parse("/etc/blktap/disks.yaml", b)
	if err != nil || len(f.Disks) != 0 {
		t.Fatalf("shipped file: %v, %d disks", err, len(f.Disks))
	}
	var ex []string
	on := false
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "# disks:") {
			on = true
		}
		if on && strings.HasPrefix(l, "#") {
			ex = append(ex, strings.TrimPrefix(strings.TrimPrefix(l, "#"), " "))
		}
	}
	f, err = config.Parse("/etc/blktap/disks.yaml", []byte(strings.Join(ex, "\n")))
	if err != nil || len(f.Disks) != 2 {
		t.Fatalf("commented example: %v, %+v", err, f)
	}
}

// What the unit must say for workers to outlive restarts and for systemd
// to order it on a Xen host.
func TestUnit(t *testing.T) {
	b, err := os.ReadFile("systemd/blktap.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"Type=notify", "KillMode=process", "Restart=on-failure",
		"ExecStart=/usr/sbin/blktap run ",
		"After=xenstored.service xen.service proc-xen.mount",
		"Wants=xenstored.service xen.service proc-xen.mount",
		"Before=xendomains.service",
		`[ "$(systemctl is-system-running)" = stopping ]; then exec /usr/sbin/blktap shutdown`,
	} {
		if !bytes.Contains(b, []byte(want)) {
			t.Errorf("blktap.service lacks %q", want)
		}
	}
}

// Maintainer scripts on a host without systemd (no systemctl, no
// deb-systemd-helper): they succeed and do nothing. prerm never closes a
// disk: only `blktap shutdown` does, and no script runs it.
func TestMaintainerScriptsWithoutSystemd(t *testing.T) {
	dir := t.TempDir()
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh")
	}
	for _, s := range []struct{ script, arg, prev string }{
		{"postinst", "configure", ""}, {"postinst", "configure", "0.0.1"},
		{"prerm", "remove", ""}, {"prerm", "upgrade", "0.2.0"},
		{"postrm", "remove", ""}, {"postrm", "purge", ""},
	} {
		cmd := exec.Command(sh, "debian/"+s.script, s.arg, s.prev)
		cmd.Env = []string{"PATH=" + dir}
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("%s %s %s without systemd: %v\n%s", s.script, s.arg, s.prev, err, out)
		}
	}
	for _, s := range []string{"postinst", "prerm", "postrm"} {
		b, _ := os.ReadFile("debian/" + s)
		code := regexp.MustCompile(`(?m)^\s*#.*$`).ReplaceAll(b, nil)
		if bytes.Contains(code, []byte("shutdown")) || bytes.Contains(code, []byte("kill")) {
			t.Errorf("%s would stop workers", s)
		}
	}
}

// make deb's work: the package holds what README and blktap(8) promise,
// and installs and purges cleanly in a scratch root.
func TestDeb(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a package")
	}
	dpkgDeb := oracle.Require(t, "dpkg-deb")
	dpkg := oracle.Require(t, "dpkg")
	bin := buildBlktap(t)
	out := t.TempDir()
	cmd := exec.Command("./deb.sh", bin, out)
	cmd.Env = append(os.Environ(), "VERSION="+changelogVersion(t))
	o, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("deb.sh: %v\n%s", err, o)
	}
	deb := strings.TrimSpace(string(o))
	if filepath.Base(deb) != "blktap_"+changelogVersion(t)+"_amd64.deb" && !strings.HasSuffix(deb, ".deb") {
		t.Fatalf("deb.sh made %q", deb)
	}
	debContents(t, dpkgDeb, deb)
	debInstallPurge(t, dpkg, deb)
}

// debContents: dpkg-deb shows the files, owners, control fields and
// conffiles the package must have.
func debContents(t *testing.T, dpkgDeb, deb string) {
	listing, err := exec.Command(dpkgDeb, "-c", deb).Output()
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"./usr/sbin/blktap", "./usr/libexec/blktap/blktap-worker", "./usr/bin/qcow-create -> ../sbin/blktap", "./usr/bin/img2qcow -> ../sbin/blktap",
		"./usr/bin/qcow2raw -> ../sbin/blktap", "./usr/sbin/tap-ctl -> blktap",
		"./lib/systemd/system/blktap.service", "./etc/xen/scripts/block-blktap", "./etc/blktap/disks.yaml",
		"./usr/share/man/man8/blktap.8.gz", "./usr/share/bash-completion/completions/blktap",
		"./usr/share/zsh/vendor-completions/_blktap", "./usr/share/fish/vendor_completions.d/blktap.fish",
		"./usr/share/doc/blktap/copyright", "./usr/share/doc/blktap/changelog.gz",
	}
	for _, w := range want {
		if !bytes.Contains(listing, []byte(w)) {
			t.Errorf("package lacks %s:\n%s", w, listing)
		}
	}
	for _, l := range strings.Split(strings.TrimSpace(string(listing)), "\n") {
		if f := strings.Fields(l); len(f) < 2 || f[1] != "root/root" {
			t.Errorf("not owned by root: %s", l)
		}
	}
	info, err := exec.Command(dpkgDeb, "-I", deb).Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{"Package: blktap", "Version: " + changelogVersion(t), "Architecture: amd64", "postinst", "prerm", "postrm", "conffiles"} {
		if !bytes.Contains(info, []byte(w)) {
			t.Errorf("dpkg-deb -I lacks %q:\n%s", w, info)
		}
	}
	conffiles, err := exec.Command(dpkgDeb, "-I", deb, "conffiles").Output()
	if err != nil || string(conffiles) != "/etc/blktap/disks.yaml\n/etc/xen/scripts/block-blktap\n" {
		t.Errorf("conffiles %q, %v", conffiles, err)
	}

}

// debInstallPurge installs into a scratch root (the scripts see DPKG_ROOT
// and leave the running system alone), removes and purges.
func debInstallPurge(t *testing.T, dpkg, deb string) {
	// Install into a scratch root; the scripts see DPKG_ROOT and leave the
	// running system alone.
	root := t.TempDir()
	admin := filepath.Join(root, "var/lib/dpkg")
	for _, d := range []string{"info", "updates", "triggers"} {
		os.MkdirAll(filepath.Join(admin, d), 0o755)
	}
	os.WriteFile(filepath.Join(admin, "status"), nil, 0o644)
	os.WriteFile(filepath.Join(admin, "available"), nil, 0o644)
	run := func(args ...string) string {
		t.Helper()
		full := append([]string{"--root=" + root, "--admindir=" + admin, "--force-script-chrootless", "--force-not-root"}, args...)
		o, err := exec.Command(dpkg, full...).CombinedOutput()
		if err != nil {
			t.Fatalf("dpkg %s: %v\n%s", strings.Join(args, " "), err, o)
		}
		return string(o)
	}
	run("-i", deb)
	if o, err := exec.Command(filepath.Join(root, "usr/sbin/blktap"), "--version").Output(); err != nil || !strings.HasPrefix(string(o), "blktap ") {
		t.Errorf("installed blktap --version: %v %q", err, o)
	}
	if err := exec.Command(filepath.Join(root, "usr/bin/qcow-create")).Run(); err == nil {
		t.Error("qcow-create with no arguments succeeded")
	} else if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 {
		t.Errorf("qcow-create with no arguments: %v, want its usage (exit 2)", err)
	}
	if st := run("-s", "blktap"); !strings.Contains(st, "Status: install ok installed") || !strings.Contains(st, "/etc/blktap/disks.yaml") {
		t.Errorf("dpkg -s:\n%s", st)
	}
	// An edited conffile survives removal; purge takes everything.
	conf := filepath.Join(root, "etc/blktap/disks.yaml")
	os.WriteFile(conf, []byte("disks: []\n# edited\n"), 0o644)
	run("-r", "blktap")
	if b, err := os.ReadFile(conf); err != nil || !bytes.Contains(b, []byte("edited")) {
		t.Errorf("edited %s after remove: %v", conf, err)
	}
	if _, err := os.Stat(filepath.Join(root, "usr/sbin/blktap")); err == nil {
		t.Error("/usr/sbin/blktap left after remove")
	}
	run("-P", "blktap")
	var left []string
	filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() && !strings.HasPrefix(p, admin) {
			left = append(left, p)
		}
		return nil
	})
	if len(left) > 0 {
		t.Errorf("left after purge: %v", left)
	}
}

// make install / make uninstall lay out the same files under DESTDIR and
// take them away, keeping an edited desired state.
func TestInstallUninstall(t *testing.T) {
	bin := buildBlktap(t)
	dest := t.TempDir()
	runSh := func(args ...string) {
		t.Helper()
		if o, err := exec.Command("./install.sh", args...).CombinedOutput(); err != nil {
			t.Fatalf("install.sh %v: %v\n%s", args, err, o)
		}
	}
	runSh("install", bin, dest, "/usr/local", "/etc", "/lib/systemd/system")
	for _, p := range []string{"usr/local/sbin/blktap", "usr/local/libexec/blktap/blktap-worker", "usr/local/bin/qcow2raw", "usr/local/sbin/tap-ctl",
		"lib/systemd/system/blktap.service", "etc/xen/scripts/block-blktap", "etc/blktap/disks.yaml",
		"usr/local/share/man/man8/blktap.8.gz", "usr/local/share/bash-completion/completions/blktap",
		"usr/local/share/zsh/site-functions/_blktap", "usr/local/share/fish/vendor_completions.d/blktap.fish"} {
		if _, err := os.Stat(filepath.Join(dest, p)); err != nil {
			t.Errorf("make install: %v", err)
		}
	}
	unit, _ := os.ReadFile(filepath.Join(dest, "lib/systemd/system/blktap.service"))
	if !bytes.Contains(unit, []byte("ExecStart=/usr/local/sbin/blktap run")) || bytes.Contains(unit, []byte("/usr/sbin/blktap")) {
		t.Errorf("unit not pointed at PREFIX:\n%s", unit)
	}
	runSh("uninstall", "", dest, "/usr/local", "/etc", "/lib/systemd/system")
	var left []string
	filepath.Walk(dest, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			left = append(left, p)
		}
		return nil
	})
	if len(left) > 0 {
		t.Errorf("left after uninstall: %v", left)
	}
	// An edited desired state stays.
	runSh("install", bin, dest, "/usr/local", "/etc", "/lib/systemd/system")
	conf := filepath.Join(dest, "etc/blktap/disks.yaml")
	os.WriteFile(conf, []byte("disks: []\n# mine\n"), 0o644)
	runSh("install", bin, dest, "/usr/local", "/etc", "/lib/systemd/system")
	runSh("uninstall", "", dest, "/usr/local", "/etc", "/lib/systemd/system")
	if b, err := os.ReadFile(conf); err != nil || !bytes.Contains(b, []byte("mine")) {
		t.Errorf("edited desired state lost: %v", err)
	}
}

// debian/copyright names every Go module compiled into the two programs
// the package ships (`go version -m` lists what the linker took).
func TestCopyrightNamesEveryModule(t *testing.T) {
	bin := buildBlktap(t)
	text, err := os.ReadFile("debian/copyright")
	if err != nil {
		t.Fatal(err)
	}
	for _, exe := range []string{bin, filepath.Join(filepath.Dir(bin), "blktap-worker")} {
		out, err := exec.Command("go", "version", "-m", exe).Output()
		if err != nil {
			t.Fatalf("go version -m %s: %v", exe, err)
		}
		deps := 0
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			if len(f) < 2 || f[0] != "dep" {
				continue
			}
			deps++
			if !bytes.Contains(text, []byte(" "+f[1]+"/*\n")) {
				t.Errorf("debian/copyright has no Files stanza for %s, compiled into %s", f[1], filepath.Base(exe))
			}
		}
		if deps == 0 {
			t.Errorf("go version -m %s lists no module: %s", exe, out)
		}
	}
}
