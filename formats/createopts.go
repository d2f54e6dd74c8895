package formats

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// createKey is one -o key of `image create` and `image convert`: how
// qemu-img names and describes it, and how we take its value. values,
// when set, are the only values we honour (qemu may know more).
type createKey struct {
	key, kind, help string
	values          []string
	set             func(co *CreateOptions, v string) error
}

// onOff reads qemu's boolean option values.
func onOff(v string) (bool, error) {
	switch v {
	case "on", "yes", "true":
		return true, nil
	case "off", "no", "false":
		return false, nil
	}
	return false, fmt.Errorf("%q is not on or off", v)
}

func sizeKey(set func(co *CreateOptions, n int64)) func(*CreateOptions, string) error {
	return func(co *CreateOptions, v string) error {
		n, err := ParseSize(v)
		if err == nil {
			set(co, n)
		}
		return err
	}
}

var (
	keySize = createKey{key: "size", kind: "size", help: "Virtual disk size",
		set: sizeKey(func(co *CreateOptions, n int64) { co.Size = n })}
	keyBackingFile = createKey{key: "backing_file", kind: "str", help: "File name of a base image",
		set: func(co *CreateOptions, v string) error { co.Backing = v; return nil }}
	keyBackingFmt = createKey{key: "backing_fmt", kind: "str", help: "Image format of the base image",
		set: func(co *CreateOptions, v string) error { co.BackingFormat = v; return nil }}
	keyClusterSize = createKey{key: "cluster_size", kind: "size", help: "Cluster size",
		set: sizeKey(func(co *CreateOptions, n int64) { co.ClusterSize = n })}
	keySubformat = func(help string, values ...string) createKey {
		return createKey{key: "subformat", kind: "str", help: help, values: values,
			set: func(co *CreateOptions, v string) error { co.Subformat = v; return nil }}
	}
	keyBool = func(key, help string, only string, set func(co *CreateOptions, b bool)) createKey {
		k := createKey{key: key, kind: "bool (on/off)", help: help, set: func(co *CreateOptions, v string) error {
			b, err := onOff(v)
			if err == nil && set != nil {
				set(co, b)
			}
			return err
		}}
		if only != "" {
			k.values = []string{only}
		}
		return k
	}
	keyOnly = func(key, kind, help string, values ...string) createKey {
		return createKey{key: key, kind: kind, help: help, values: values,
			set: func(*CreateOptions, string) error { return nil }}
	}
)

// createKeys are the keys we honour per format, qemu-img's spellings
// first; a key qemu-img knows for the format but missing here is refused
// by name (see qemuOnlyKeys).
var createKeys = map[string][]createKey{
	"raw": {keySize},
	"qcow": {keySize, keyBackingFile, keyBackingFmt,
		withHelp(keyClusterSize, "Cluster size (blktap; qemu-img has no such option for qcow)"),
		keyBool("encryption", "Encrypt the image (only off: encrypted images are refused)", "off", nil)},
	"qcow2": {keySize, keyBackingFile, keyBackingFmt, withHelp(keyClusterSize, "qcow2 cluster size"),
		{key: "compat", kind: "str", help: "Compatibility level (v2 [0.10] or v3 [1.1])", values: []string{"0.10", "1.1", "v2", "v3"},
			set: func(co *CreateOptions, v string) error { co.Compat = v; return nil }},
		keySubformat("Same as compat (blktap's older spelling)", "0.10", "1.1", "v2", "v3"),
		{key: "compression_type", kind: "str", help: "Compression method used for image cluster compression", values: []string{"zlib", "zstd"},
			set: func(co *CreateOptions, v string) error { co.CompressionType = v; return nil }},
		keyBool("encryption", "Encrypt the image (only off: encrypted images are refused)", "off", nil),
		keyBool("extended_l2", "Extended L2 tables (only off)", "off", nil),
		keyBool("lazy_refcounts", "Postpone refcount updates", "", func(co *CreateOptions, b bool) { co.LazyRefcounts = b }),
		keyOnly("preallocation", "str", "Preallocation mode (only off)", "off"),
		{key: "refcount_bits", kind: "num", help: "Width of a reference count entry in bits",
			set: func(co *CreateOptions, v string) error {
				n, err := strconv.Atoi(v)
				co.RefcountBits = n
				return err
			}},
	},
	"vhd": {keySize, keySubformat("Type of virtual hard disk format: dynamic (default) or fixed", "dynamic", "fixed"),
		keyBool("force_size", "Store the size as given, not rounded to a CHS geometry (only on: blktap always does)", "on", nil),
		withHelp(withKey(keyClusterSize, "block_size"), "Block size of a dynamic disk (blktap; default 2 MiB)"),
		withHelp(keyBackingFile, "Parent of a differencing disk (blktap; qemu's vpc has none)"),
		withHelp(keyBackingFmt, "Must be vpc or vhd if present (blktap)")},
	"vmdk": {keySize, keyBackingFile, withHelp(keyBackingFmt, "Must be 'vmdk' if present"),
		{key: "adapter_type", kind: "str", help: "Virtual adapter type: ide (default), lsilogic, buslogic or legacyESX",
			values: []string{"ide", "lsilogic", "buslogic", "legacyESX"},
			set:    func(co *CreateOptions, v string) error { co.AdapterType = v; return nil }},
		withHelp(keyClusterSize, "Grain size (blktap; qemu-img has no such option for vmdk)"),
		keyBool("compat6", "VMDK version 6 image (only off)", "off", nil),
		keySubformat("VMDK subformat: monolithicSparse (default) or monolithicFlat; streamOptimized by convert only",
			"monolithicSparse", "monolithicFlat", "streamOptimized"),
		keyBool("zeroed_grain", "Enable efficient zero writes using the zeroed-grain GTE feature", "", func(co *CreateOptions, b bool) { co.ZeroedGrain = b }),
	},
	"rbd": rbdCreateKeys,
}

// qemuOnlyKeys are keys qemu-img 7.2 accepts for a format that we do
// not, so they are refused by name rather than as unknown.
var qemuOnlyKeys = map[string][]string{
	"qcow":  {"encrypt.format", "encrypt.key-secret"},
	"qcow2": {"data_file", "data_file_raw", "encrypt.cipher-alg", "encrypt.cipher-mode", "encrypt.format", "encrypt.hash-alg", "encrypt.iter-time", "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg", "encrypt.key-secret"},
	"vmdk":  {"hwversion", "toolsversion"},
	"rbd":   {"encrypt.cipher-alg", "encrypt.format", "encrypt.key-secret", "password-secret"},
}

func withHelp(k createKey, help string) createKey { k.help = help; return k }
func withKey(k createKey, key string) createKey   { k.key = key; return k }

// validKeys lists the keys we honour for format, for error messages.
func validKeys(format string) string {
	var ks []string
	for _, k := range createKeys[format] {
		ks = append(ks, k.key)
	}
	sort.Strings(ks)
	return strings.Join(ks, ", ")
}

// CreateOptionsHelp is `-o help` for format: the keys we honour, laid
// out as qemu-img lays out its list.
func CreateOptionsHelp(format string) (string, error) {
	name, err := Normalize(format)
	if err != nil {
		return "", err
	}
	keys, ok := createKeys[name]
	if !ok {
		return "", fmt.Errorf("%w: format %q has no image file to create", ErrUnsupported, name)
	}
	keys = append([]createKey(nil), keys...)
	sort.Slice(keys, func(i, j int) bool { return keys[i].key < keys[j].key })
	var b strings.Builder
	fmt.Fprintf(&b, "Supported %s options:\n", QemuName(name))
	for _, k := range keys {
		help := k.help
		if len(k.values) > 0 && !strings.Contains(help, k.values[0]) {
			help += " (" + strings.Join(k.values, ", ") + ")"
		}
		fmt.Fprintf(&b, "  %-22s - %s\n", k.key+"=<"+k.kind+">", help)
	}
	if q := qemuOnlyKeys[name]; len(q) > 0 {
		fmt.Fprintf(&b, "\nqemu-img also knows, not supported here: %s\n", strings.Join(q, ", "))
	}
	return b.String(), nil
}

// ApplyCreateOption sets -o key=value on co for format, or says why not:
// a key or value we do not honour is refused naming the ones we do.
func ApplyCreateOption(format string, co *CreateOptions, key, value string) error {
	name, err := Normalize(format)
	if err != nil {
		return err
	}
	for _, k := range createKeys[name] {
		if k.key != key {
			continue
		}
		if len(k.values) > 0 {
			v := value
			if k.kind == "bool (on/off)" {
				b, err := onOff(value)
				if err != nil {
					return fmt.Errorf("-o %s=%s: %v", key, value, err)
				}
				v = map[bool]string{true: "on", false: "off"}[b]
			}
			found := false
			for _, ok := range k.values {
				found = found || ok == v
			}
			if !found {
				return fmt.Errorf("%s=%s is not supported for %s; valid: %s", key, value, QemuName(name), strings.Join(k.values, ", "))
			}
		}
		if err := k.set(co, value); err != nil {
			return fmt.Errorf("-o %s=%s: %v", key, value, err)
		}
		return nil
	}
	return fmt.Errorf("%s is not supported for %s; valid: %s", key, QemuName(name), validKeys(name))
}
