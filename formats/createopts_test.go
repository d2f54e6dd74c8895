package formats

import (
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/internal/oracle"
)

// TestCreateKeysCoverQemu: every -o key qemu-img lists for one of our
// formats is one we honour or one we refuse by name, never unknown.
func TestCreateKeysCoverQemu(t *testing.T) {
	qi := oracle.Require(t, "qemu-img")
	keyRe := regexp.MustCompile(`^  ([a-z0-9_.-]+)=<`)
	for _, f := range []string{"raw", "qcow", "qcow2", "vhd", "vmdk"} {
		out, err := exec.Command(qi, "create", "-f", QemuName(f), "-o", "help").CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v\n%s", f, err, out)
		}
		var n int
		for _, l := range strings.Split(string(out), "\n") {
			m := keyRe.FindStringSubmatch(l)
			if m == nil {
				continue
			}
			n++
			key := m[1]
			ours := slices.ContainsFunc(createKeys[f], func(k createKey) bool { return k.key == key })
			refused := slices.Contains(qemuOnlyKeys[f], key)
			if ours == refused {
				t.Errorf("%s: qemu-img's key %s: honoured %v, refused by name %v; want exactly one", f, key, ours, refused)
			}
			help, _ := CreateOptionsHelp(f)
			if ours != strings.Contains(help, "\n  "+key+"=<") {
				t.Errorf("%s: -o help and the key table disagree on %s", f, key)
			}
		}
		if n == 0 {
			t.Fatalf("%s: no keys read from qemu-img's -o help:\n%s", f, out)
		}
	}
}

// applyCases: FORMAT KEY=VALUE, then after " | " the error wanted (none:
// the option is honoured).
const applyCases = `
qcow2 lazy_refcounts=on
qcow2 refcount_bits=8
qcow2 compat=0.10
qcow2 size=1G
qcow2 preallocation=off
qcow2 preallocation=metadata | preallocation=metadata is not supported for qcow2; valid: off
qcow2 data_file=x | data_file is not supported for qcow2; valid: backing_file, 
qcow2 lazy_refcounts=maybe | "maybe" is not on or off
qcow2 compression_type=lz4 | compression_type=lz4 is not supported for qcow2; valid: zlib, zstd
raw cluster_size=64k | cluster_size is not supported for raw; valid: size
vhd force_size=off | force_size=off is not supported for vpc; valid: on
vhd subformat=fixed
vmdk zeroed_grain=on
vmdk hwversion=4 | hwversion is not supported for vmdk; valid: adapter_type, `

func TestApplyCreateOption(t *testing.T) {
	var co CreateOptions
	for _, line := range strings.Split(strings.TrimSpace(applyCases), "\n") {
		spec, want, _ := strings.Cut(line, " | ")
		format, kv, _ := strings.Cut(spec, " ")
		key, value, _ := strings.Cut(kv, "=")
		err := ApplyCreateOption(format, &co, key, value)
		switch {
		case want == "" && err != nil:
			t.Errorf("%s: %v", spec, err)
		case want != "" && (err == nil || !strings.Contains(err.Error(), want)):
			t.Errorf("%s: got %v, want %q", spec, err, want)
		}
	}
	if !co.LazyRefcounts || co.RefcountBits != 8 || co.Compat != "0.10" || co.Size != 1<<30 || co.Subformat != "fixed" || !co.ZeroedGrain {
		t.Errorf("options not applied: %+v", co)
	}
}
