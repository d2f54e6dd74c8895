package config

import (
	"errors"
	"fmt"
	goparser "go/parser"
	"go/token"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// badFixtures: each testdata/bad-*.yaml and the problems it must report,
// in order, as "line:col substring" ("line:0" where YAML gives no column).
var badFixtures = map[string][]string{
	"bad-alias.yaml":                  {"3:5 aliases are not supported"},
	"bad-backing-format-alone.yaml":   {"6:40 backing-format without backing"},
	"bad-create-no-size.yaml":         {"6:13 size is required"},
	"bad-create-raw-backing.yaml":     {"6:33 raw images cannot have a backing file"},
	"bad-device-partition-zero.yaml":  {"5:13 \"xvda0\""},
	"bad-device.yaml":                 {"5:13 sd disks are sda..sdp"},
	"bad-disk-not-mapping.yaml":       {"2:5 must be a mapping"},
	"bad-disks-not-list.yaml":         {"2:3 disks must be a list"},
	"bad-domain-negative.yaml":        {"5:13 from 0 to 32751, not -1"},
	"bad-domain-reserved.yaml":        {"5:13 not 32752"},
	"bad-domain-string.yaml":          {"5:13 must be an integer"},
	"bad-duplicate-device.yaml":       {"3:62 domain 3 device xvdb (51728) already used by the disk at line 2"},
	"bad-duplicate-export.yaml":       {"3:65 export \"127.0.0.1:10809\" already used"},
	"bad-duplicate-key.yaml":          {"6:5 duplicate key \"name\" (first at line 2)"},
	"bad-duplicate-name.yaml":         {"3:12 name already used by the disk at line 2"},
	"bad-export-both.yaml":            {"6:13 socket or tcp, not both"},
	"bad-export-socket-too-long.yaml": {"6:22 unix sockets allow 107"},
	"bad-export-tcp-port.yaml":        {"6:19 \"70000\" must be 1..65535"},
	// Issue 8 item 3: TCP only when asked, then TLS unless insecure is
	// explicit, and insecure only on loopback.
	"bad-export-tcp-no-tls.yaml":        {"6:19 a tcp export needs tls: {cert: FILE, key: FILE} or, on loopback only, insecure: true"},
	"bad-export-insecure-false.yaml":    {"7:12 a tcp export needs tls"},
	"bad-export-insecure-remote.yaml":   {"8:17 insecure is allowed on loopback only; \"192.0.2.7\""},
	"bad-export-insecure-wildcard.yaml": {"6:46 insecure is allowed on loopback only; \"0.0.0.0\""},
	"bad-export-insecure-not-bool.yaml": {"6:48 insecure must be true or false, not str \"yes\""},
	"bad-export-insecure-socket.yaml":   {"6:45 insecure is for tcp exports"},
	"bad-export-tls-socket.yaml":        {"8:12 tls is for tcp exports"},
	"bad-export-tls-and-insecure.yaml":  {"9:17 tls or insecure, not both"},
	"bad-export-tls-no-key.yaml":        {"8:12 tls: key is required", "8:31 tls: unknown key \"password\" (valid: cert, key, ca)"},
	"bad-format.yaml":                   {"4:13 unknown format \"qed\""},
	"bad-image-null.yaml":               {"3:11 image must be a string, not nothing"},
	"bad-io.yaml":                       {"6:9 io \"aio\": want one of auto, threads, uring"},
	"bad-many-errors.yaml": {
		"5:11 mode must be r or w",
		"9:13 unknown format \"vhdx\"",
		"10:13 \"hde\"",
		"11:5 unknown key \"colour\"",
	},
	"bad-missing-keys.yaml": {
		"2:5 format is required",
		"2:5 image is required",
		"2:5 device is required",
	},
	"bad-mode.yaml":                  {"5:11 not \"rw\""},
	"bad-name-chars.yaml":            {"2:11 has '/'"},
	"bad-name-dotdot.yaml":           {"2:11 not a usable file name"},
	"bad-name-mapping.yaml":          {"2:11 name must be a string, not a mapping"},
	"bad-rbd-spec.yaml":              {"2:35 unknown option \"secret\""},
	"bad-rbd-shared-writable.yaml":   {"3:35 image \"rbd/vm1:conf=/etc/ceph/ceph.conf\" is also used by the disk at line 2"},
	"bad-rbd-create-backing.yaml":    {"6:33 rbd images cannot have a backing file"},
	"bad-qos-negative.yaml":          {"6:17 iops must be an integer from 0", "6:32 bad size \"fast\""},
	"bad-shared-writable-image.yaml": {"3:22 image \"/a.raw\" is also used by the disk at line 2"},
	"bad-size-ambiguous.yaml":        {"6:20 \"GB\" is ambiguous"},
	"bad-size-zero.yaml":             {"6:20 size must be more than 0"},
	"bad-syntax-tab.yaml":            {"3:1 a tab in the indentation"},
	// yaml.v3 gives the line where the unclosed mapping's context starts
	// (0-based, so the line above it) and no column.
	"bad-syntax-unclosed.yaml": {"1:0 did not find expected ',' or '}'"},
	"bad-two-documents.yaml":   {"2:1 a second YAML document"},
	"bad-unknown-key.yaml":     {"6:5 disk \"a\": unknown key \"cache\""},
	"bad-unknown-top-key.yaml": {"1:1 unknown key \"version\" (valid: disks)"},
}

func TestBadFixtures(t *testing.T) {
	files, err := filepath.Glob("testdata/bad-*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != len(badFixtures) {
		t.Errorf("%d bad fixtures on disk, %d in the table", len(files), len(badFixtures))
	}
	for _, path := range files {
		name := filepath.Base(path)
		want, ok := badFixtures[name]
		if !ok {
			t.Errorf("%s: no expectation in badFixtures", name)
			continue
		}
		f, err := Load(path)
		if err == nil {
			t.Errorf("%s: accepted: %+v", name, f)
			continue
		}
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: error is not ErrInvalid: %v", name, err)
		}
		abs, _ := filepath.Abs(path)
		lines := strings.Split(err.Error(), "\n")
		if len(lines) != len(want) {
			t.Errorf("%s: %d problems reported, want %d:\n%v", name, len(lines), len(want), err)
			continue
		}
		for i, w := range want {
			pos, sub, _ := strings.Cut(w, " ")
			prefix := abs + ":" + strings.TrimSuffix(pos, ":0") + ": "
			if !strings.HasPrefix(lines[i], prefix) || !strings.Contains(lines[i], sub) {
				t.Errorf("%s: problem %d is\n\t%s\nwant prefix %q containing %q", name, i+1, lines[i], prefix, sub)
			}
		}
	}
}

func TestGoodFull(t *testing.T) {
	f, err := Load("testdata/good-full.yaml")
	if err != nil {
		t.Fatal(err)
	}
	dir, _ := filepath.Abs("testdata")
	want := []Disk{{
		Name: "scratch", Image: filepath.Join(dir, "images/scratch.qcow2"), Format: "qcow2", Mode: "r",
		Domain: 7, Device: "xvdb1", DevID: 51729,
		Create: &Create{Size: 3 << 29, Backing: filepath.Join(filepath.Dir(dir), "base.raw"), BackingFormat: "raw"},
		Export: Export{Socket: filepath.Join(dir, "run/scratch.sock")},
		QoS:    QoS{IOPS: 5000, Bandwidth: 200 << 20}, Line: 3,
	}, {
		Name: "numeric.dev_1", Image: "/abs/disk.img", Format: "raw", Mode: "w", Device: "51712", DevID: 51712,
		Export: Export{TCP: "0.0.0.0:10809", TLSCert: filepath.Join(dir, "certs/server-cert.pem"),
			TLSKey: "/etc/blktap/server-key.pem", TLSCA: filepath.Join(filepath.Dir(dir), "ca.pem")},
		QoS: QoS{Bandwidth: 1 << 20}, Line: 12,
	}, {
		Name: "remote", Image: "nbd+unix:///?socket=/run/x.sock", Format: "nbd", Mode: "w", Domain: 2,
		Device: "d20p3", DevID: 1<<28 | 20<<8 | 3, Line: 21,
	}, {
		Name: "local-tcp", Image: "/abs/local.img", Format: "raw", Mode: "w", Device: "xvdc", DevID: 51744,
		Export: Export{TCP: "[::1]:10810", Insecure: true}, IO: "uring", Line: 26,
	}}
	if !reflect.DeepEqual(f.Disks, want) {
		t.Errorf("got\n%+v\nwant\n%+v", f.Disks, want)
		for i := range min(len(f.Disks), len(want)) {
			if f.Disks[i].Create != nil && want[i].Create != nil {
				t.Logf("create %d: %+v vs %+v", i, *f.Disks[i].Create, *want[i].Create)
			}
		}
	}
	if f.Path != filepath.Join(dir, "good-full.yaml") {
		t.Errorf("path %q", f.Path)
	}
	if !f.Disks[0].ReadOnly() || f.Disks[1].ReadOnly() {
		t.Error("ReadOnly wrong")
	}
}

func TestGoodEmpty(t *testing.T) {
	for _, name := range []string{"good-empty.yaml", "good-no-disks.yaml"} {
		f, err := Load(filepath.Join("testdata", name))
		if err != nil || len(f.Disks) != 0 {
			t.Errorf("%s: %+v, %v", name, f, err)
		}
	}
	if f, err := Parse("x.yaml", nil); err != nil || len(f.Disks) != 0 {
		t.Errorf("empty input: %+v %v", f, err)
	}
}

// The example shipped for `make run` must load, and say what README.md
// ("Desired state") and issue 3 ask of it.
func TestExample(t *testing.T) {
	f, err := Load("../examples/disks.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var doms []uint32
	for _, d := range f.Disks {
		doms = append(doms, d.Domain)
		if d.Format != "raw" || d.Create == nil || d.Create.Size != 1<<30 ||
			!strings.HasPrefix(d.Image, "/var/tmp/blktap/") || d.Mode != "w" {
			t.Errorf("disk %+v", d)
		}
	}
	if !reflect.DeepEqual(doms, []uint32{0, 1}) {
		t.Errorf("domains %v, want a dom0 disk and a domain-1 disk", doms)
	}
}

func TestParseLimits(t *testing.T) {
	big := make([]byte, MaxFileSize+1)
	if _, err := Parse("big.yaml", big); !errors.Is(err, ErrInvalid) {
		t.Errorf("oversized file: %v", err)
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.yaml")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}

// Devids from xen-vbd-interface(7) and docs/WIRE.md, section "Virtual-device numbers".
var vdevs = map[string]uint32{
	"xvda": 51712, "xvdb": 51728, "xvda1": 51713, "xvdp": 202<<8 | 15<<4, "xvdp15": 202<<8 | 15<<4 | 15,
	"xvdq": 1<<28 | 16<<8, "xvdz": 1<<28 | 25<<8, "xvdaa": 1<<28 | 26<<8, "xvdaz": 1<<28 | 51<<8,
	"xvdba": 1<<28 | 52<<8, "xvdzz": 1<<28 | 701<<8, "xvdaaa": 1<<28 | 702<<8, "xvda16": 1<<28 | 16,
	"xvdq255": 1<<28 | 16<<8 | 255,
	"sda":     2048, "sdb3": 8<<8 | 1<<4 | 3, "sdp15": 8<<8 | 15<<4 | 15,
	"hda": 768, "hdb": 3<<8 | 1<<6, "hda63": 3<<8 | 63, "hdc": 22 << 8, "hdd1": 22<<8 | 1<<6 | 1,
	"d0": 51712, "d1p2": 51730, "d16": 1<<28 | 16<<8, "d0p16": 1<<28 | 16,
	"51728": 51728, "1": 1, "4294967295": 4294967295,
}

func TestParseVdev(t *testing.T) {
	for in, want := range vdevs {
		if got, err := ParseVdev(in); got != want || err != nil {
			t.Errorf("ParseVdev(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "xvd", "xvda0", "xvda01", "xvdA", "xvd1", "vda", "sdq", "sda16", "hde",
		"hda64", "0", "051728", "4294967296", "-1", "+5", "xvdq256", "d", "dp1", "d1p", "d1p0", "d01",
		"d1048576", "xvdbzzzz", "xvdaaaaaa", " xvda", "xvda ", "xvda\x00", "sda1x"} {
		if got, err := ParseVdev(in); err == nil {
			t.Errorf("ParseVdev(%q) = %d, want an error", in, got)
		}
	}
}

func TestVdevName(t *testing.T) {
	for name, id := range vdevs {
		got := VdevName(id)
		if back, err := ParseVdev(got); back != id || err != nil {
			t.Errorf("VdevName(%d) = %q, which parses to %d, %v", id, got, back, err)
		}
		if name[0] != 'd' && (name[0] < '0' || name[0] > '9') && got != name {
			t.Errorf("VdevName(%d) = %q, want %q", id, got, name)
		}
	}
	// Numbers with no name stay numbers.
	for _, id := range []uint32{1, 2 << 28, 1<<28 | 5<<8, 202<<8 - 1, 3<<8 | 2<<6, 0xffffffff} {
		if got := VdevName(id); got != strconv.FormatUint(uint64(id), 10) {
			t.Errorf("VdevName(%d) = %q", id, got)
		}
	}
}

func FuzzVdev(f *testing.F) {
	for name := range vdevs {
		f.Add(name)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := ParseVdev(s)
		if err != nil {
			return
		}
		if back, err := ParseVdev(VdevName(id)); back != id || err != nil {
			t.Fatalf("%q -> %d -> %q -> %d, %v", s, id, VdevName(id), back, err)
		}
	})
}

// FuzzParse: never a panic; every error is ErrInvalid with a position;
// every accepted file obeys the invariants and parses the same again.
func FuzzParse(f *testing.F) {
	files, _ := filepath.Glob("testdata/*.yaml")
	files = append(files, "../examples/disks.yaml")
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		file, err := Parse("/etc/blktap/f.yaml", data)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("unclassified error: %v", err)
			}
			for _, l := range strings.Split(err.Error(), "\n") {
				if !strings.HasPrefix(l, "/etc/blktap/f.yaml:") {
					t.Fatalf("problem without position: %q", l)
				}
			}
			return
		}
		for _, d := range file.Disks {
			if checkName(d.Name) != nil || (d.Mode != "r" && d.Mode != "w") || d.Domain > maxDomain {
				t.Fatalf("accepted bad disk %+v", d)
			}
			if _, ok := normalizeFormat(d.Format); !ok || d.Format == "aio" || d.Format == "vpc" {
				t.Fatalf("format not canonical: %+v", d)
			}
			if id, err := ParseVdev(d.Device); err != nil || id != d.DevID {
				t.Fatalf("device %q devid %d: %v", d.Device, d.DevID, err)
			}
			if d.Format != "nbd" && !filepath.IsAbs(d.Image) {
				t.Fatalf("relative image %q", d.Image)
			}
			e := d.Export
			if e.TCP != "" {
				host, _, _ := net.SplitHostPort(e.TCP)
				if (e.TLSCert == "") == !e.Insecure || e.Insecure && !isLoopback(host) {
					t.Fatalf("tcp export without TLS, or insecure off loopback: %+v", e)
				}
			} else if e.TLSCert != "" || e.Insecure {
				t.Fatalf("tls or insecure without tcp: %+v", e)
			}
		}
		again, err := Parse("/etc/blktap/f.yaml", data)
		if err != nil || !reflect.DeepEqual(file, again) {
			t.Fatalf("second parse differs: %v", err)
		}
	})
}

// docs/ARCHITECTURE.md, section "Arrows": config imports nothing of the project but the leaves
// internal/units (sizes, shared with formats) and internal/rbdspec (rbd
// image names, shared with formats/rbd).
func TestLayering(t *testing.T) {
	files, _ := filepath.Glob("*.go")
	for _, p := range files {
		f, err := goparser.ParseFile(token.NewFileSet(), p, nil, goparser.ImportsOnly)
		if err != nil {
			t.Fatal(err)
		}
		for _, imp := range f.Imports {
			if path, _ := strconv.Unquote(imp.Path.Value); strings.HasPrefix(path, "github.com/blktap-go/blktap/") &&
				path != "github.com/blktap-go/blktap/internal/units" && path != "github.com/blktap-go/blktap/internal/rbdspec" {
				t.Errorf("%s imports %s", p, path)
			}
		}
	}
}

// Which hosts count as loopback for insecure: true (issue 8 item 3).
func TestExportInsecureHosts(t *testing.T) {
	for host, ok := range map[string]bool{
		"127.0.0.1": true, "127.9.8.7": true, "[::1]": true, "localhost": true, "LocalHost": true,
		"0.0.0.0": false, "[::]": false, "10.0.0.1": false, "example.com": false, "localhost.example.com": false,
		"[::ffff:127.0.0.1]": true, "[fe80::1%lo]": false,
	} {
		y := fmt.Sprintf("disks: [{name: a, image: /a.raw, format: raw, device: xvdb, export: {tcp: %q, insecure: true}}]", host+":10809")
		_, err := Parse("x.yaml", []byte(y))
		if ok != (err == nil) {
			t.Errorf("insecure on %s: %v, want accepted=%v", host, err, ok)
		}
		// With TLS every host is fine.
		y = fmt.Sprintf("disks: [{name: a, image: /a.raw, format: raw, device: xvdb, export: {tcp: %q, tls: {cert: c.pem, key: k.pem}}}]", host+":10809")
		if f, err := Parse("/etc/x.yaml", []byte(y)); err != nil {
			t.Errorf("tls on %s: %v", host, err)
		} else if e := f.Disks[0].Export; e.TLSCert != "/etc/c.pem" || e.TLSKey != "/etc/k.pem" || e.TLSCA != "" || e.Insecure {
			t.Errorf("tls on %s: %+v", host, e)
		}
	}
}

func TestRelativeName(t *testing.T) {
	f, err := Parse("sub/d.yaml", []byte("disks: [{name: a, image: a.raw, format: raw, device: xvdb}]"))
	if err != nil {
		t.Fatal(err)
	}
	wd, _ := os.Getwd()
	if want := filepath.Join(wd, "sub", "a.raw"); f.Disks[0].Image != want {
		t.Errorf("image %q, want %q", f.Disks[0].Image, want)
	}
}

// The same table as formats' TestParseSize: the two copies must agree.

// Issue 16 item 4: only disks: [] says "no disks"; what a half-written
// save or an empty template leaves says nothing, and a reload of it must
// not detach every disk.
func TestNoDisksMustBeExplicit(t *testing.T) {
	one := "disks:\n  - {name: a, image: /i/a.raw, format: raw, device: xvdb}\n"
	for _, c := range []struct {
		name, text string
		explicit   bool
	}{
		{"empty", "", false},
		{"blank lines", "\n\n", false},
		{"comments only", "# disks:\n#   - name: a\n", false},
		{"bare disks key", "disks:\n", false},
		{"disks null", "disks: null\n", false},
		{"truncated after the key", "disks:\n  ", false},
		{"explicit empty list", "disks: []\n", true},
		{"explicit empty block list", "# nothing served here\ndisks: []  # on purpose\n", true},
	} {
		f, err := Parse("/etc/blktap/disks.yaml", []byte(c.text))
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if len(f.Disks) != 0 || f.NoDisks != c.explicit {
			t.Errorf("%s: %d disks, NoDisks %v; want 0, %v", c.name, len(f.Disks), f.NoDisks, c.explicit)
		}
		err = f.CheckDropAll(2)
		if c.explicit && err != nil {
			t.Errorf("%s: CheckDropAll: %v", c.name, err)
		}
		if !c.explicit {
			if !errors.Is(err, ErrDropsAll) || !strings.Contains(err.Error(), "write disks: []") ||
				!strings.Contains(err.Error(), "keeping the 2 disks") {
				t.Errorf("%s: CheckDropAll = %v; want ErrDropsAll naming disks: []", c.name, err)
			}
			// Nothing to drop: a fresh daemon with an empty file is fine.
			if err := f.CheckDropAll(0); err != nil {
				t.Errorf("%s: CheckDropAll(0): %v", c.name, err)
			}
		}
	}
	f, err := Parse("/etc/blktap/disks.yaml", []byte(one))
	if err != nil {
		t.Fatal(err)
	}
	if f.NoDisks || f.CheckDropAll(5) != nil {
		t.Errorf("one disk: NoDisks %v, CheckDropAll %v", f.NoDisks, f.CheckDropAll(5))
	}
}

// Issue 16 item 4: the file must be a regular file owned by root or the
// reader, and a refused file is not parsed, so its contents appear in no
// message.
func TestLoadRefusesUntrustedFile(t *testing.T) {
	dir := t.TempDir()
	secret := "root-password-secret: hunter2\n" // an unknown key: a parse error would quote it
	good := filepath.Join(dir, "disks.yaml")
	if err := os.WriteFile(good, []byte("disks: []\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if f, err := Load(good); err != nil || !f.NoDisks {
		t.Fatalf("own regular file: %v", err)
	}
	// Through a symlink: the target is what counts.
	link := filepath.Join(dir, "link.yaml")
	if err := os.Symlink(good, link); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(link); err != nil {
		t.Errorf("symlink to an own file: %v", err)
	}
	// A FIFO: refused at once, not waited on.
	fifo := filepath.Join(dir, "fifo.yaml")
	if err := syscallMkfifo(fifo); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(fifo); !errors.Is(err, ErrUntrusted) || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("fifo: %v", err)
	}
	if _, err := Load(dir); !errors.Is(err, ErrUntrusted) {
		t.Errorf("directory: %v", err)
	}
	// Another owner: checkTrusted with a uid that is neither root nor
	// the file's (a test cannot chown without being root).
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte(secret), 0o644); err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 {
		// Root can give the file away: then Load itself must refuse it.
		if err := os.Chown(bad, 54321, 54321); err != nil {
			t.Fatal(err)
		}
		_, err := Load(bad)
		if !errors.Is(err, ErrUntrusted) || !strings.Contains(err.Error(), "owned by uid 54321") {
			t.Errorf("foreign owner: %v", err)
		}
		if err != nil && strings.Contains(err.Error(), "secret") {
			t.Errorf("the refusal echoes the contents: %v", err)
		}
		return
	}
	// Not root: a file cannot be given away, so ask as another uid would.
	fh, err := os.Open(bad)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	owner := os.Geteuid()
	err = checkTrusted(bad, fh, owner+1)
	if !errors.Is(err, ErrUntrusted) || !strings.Contains(err.Error(), fmt.Sprintf("owned by uid %d", owner)) {
		t.Errorf("foreign owner: %v", err)
	}
	if err != nil && strings.Contains(err.Error(), "secret") {
		t.Errorf("the refusal echoes the contents: %v", err)
	}
}

func syscallMkfifo(path string) error { return syscall.Mkfifo(path, 0o600) }
