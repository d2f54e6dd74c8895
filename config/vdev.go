package config

import (
	"fmt"
	"strconv"
	"strings"
)

// Virtual-device numbers (docs/WIRE.md, section "Virtual-device numbers"; xen-vbd-interface(7)):
//
//	name            disk      part     devid
//	xvd[a-p][N]     0..15     0..15    202<<8 | disk<<4 | part
//	xvd<letters>[N] 0..2^20-1 0..255   1<<28 | disk<<8 | part   (disk >= 16 or part >= 16)
//	d<D>[p<P>]      as xvd, by number
//	sd[a-p][N]      0..15     0..15    8<<8 | disk<<4 | part
//	hd[ab][N]       0..1      0..63    3<<8 | disk<<6 | part
//	hd[cd][N]       2..3      0..63    22<<8 | (disk-2)<<6 | part
//
// Disk letters count a..z, aa..az, ... (bijective base 26). A partition
// number is 1.. without leading zeros; none means the whole disk.
const (
	xvdMajor      = 202
	sdMajor       = 8
	hdMajor01     = 3
	hdMajor23     = 22
	extendedFlag  = 1 << 28
	maxExtDisk    = 1<<20 - 1
	maxExtPart    = 255
	maxLetterRuns = 5 // zzzzz is past 2^20 already
)

// ParseVdev reads a virtual-device name ("xvdb", "xvda1", "xvdaa", "sdb",
// "hda", "d1p2") or a decimal number ("51728") and returns its devid.
func ParseVdev(s string) (uint32, error) {
	bad := func(why string) (uint32, error) {
		return 0, fmt.Errorf("bad virtual device %q: %s (write e.g. xvdb, xvda1, sdb, hda or a number like 51728)", s, why)
	}
	if s == "" {
		return bad("empty")
	}
	if s[0] >= '0' && s[0] <= '9' {
		if len(s) > 1 && s[0] == '0' {
			return bad("leading zero")
		}
		n, err := strconv.ParseUint(s, 10, 32)
		if err != nil {
			return bad("not a 32-bit decimal number")
		}
		if n == 0 {
			return bad("devid 0 names no disk")
		}
		return uint32(n), nil
	}
	var prefix string
	for _, p := range []string{"xvd", "sd", "hd", "d"} {
		if strings.HasPrefix(s, p) {
			prefix = p
			break
		}
	}
	rest := s[len(prefix):]
	var devid uint32
	var why string
	switch prefix {
	case "":
		return bad("unknown prefix (xvd, sd, hd or d)")
	case "d":
		devid, why = numberedVdev(rest)
	default:
		devid, why = letteredVdev(prefix, rest)
	}
	if why != "" {
		return bad(why)
	}
	return devid, nil
}

// numberedVdev reads what follows "d" in d<D>[p<P>]; why says what is
// wrong with it, "" when nothing is.
func numberedVdev(rest string) (devid uint32, why string) {
	i := strings.IndexByte(rest, 'p')
	ds, ps := rest, ""
	if i >= 0 {
		ds, ps = rest[:i], rest[i+1:]
		if ps == "" {
			return 0, "no partition number after p"
		}
	}
	disk, err := decimal(ds, maxExtDisk)
	if err != nil {
		return 0, "disk number " + err.Error()
	}
	var part uint64
	if ps != "" {
		if part, err = decimal(ps, maxExtPart); err != nil || part == 0 {
			return 0, "partition number must be 1.." + strconv.Itoa(maxExtPart)
		}
	}
	return xvd(disk, part), ""
}

// letteredVdev reads what follows prefix (xvd, sd or hd): disk letters
// and an optional partition number; why says what is wrong with it.
func letteredVdev(prefix, rest string) (devid uint32, why string) {
	i := 0
	for i < len(rest) && rest[i] >= 'a' && rest[i] <= 'z' {
		i++
	}
	if i == 0 {
		return 0, "no disk letter after " + prefix
	}
	if i > maxLetterRuns {
		return 0, "disk letters too long"
	}
	var disk, part uint64
	for _, c := range rest[:i] {
		disk = disk*26 + uint64(c-'a') + 1
	}
	disk--
	if ps := rest[i:]; ps != "" {
		var err error
		if part, err = decimal(ps, 1<<20); err != nil || part == 0 {
			return 0, "partition must be a number from 1"
		}
	}
	switch prefix {
	case "xvd":
		if disk > maxExtDisk || part > maxExtPart {
			return 0, fmt.Sprintf("xvd disks go up to %d and partitions to %d", maxExtDisk, maxExtPart)
		}
		return xvd(disk, part), ""
	case "sd":
		if disk > 15 || part > 15 {
			return 0, "sd disks are sda..sdp with partitions 1..15"
		}
		return sdMajor<<8 | uint32(disk)<<4 | uint32(part), ""
	default: // hd
		if disk > 3 || part > 63 {
			return 0, "hd disks are hda..hdd with partitions 1..63"
		}
		if disk < 2 {
			return hdMajor01<<8 | uint32(disk)<<6 | uint32(part), ""
		}
		return hdMajor23<<8 | uint32(disk-2)<<6 | uint32(part), ""
	}
}

func xvd(disk, part uint64) uint32 {
	if disk < 16 && part < 16 {
		return xvdMajor<<8 | uint32(disk)<<4 | uint32(part)
	}
	return extendedFlag | uint32(disk)<<8 | uint32(part)
}

// decimal reads a decimal number with no sign or leading zero, at most max.
func decimal(s string, max uint64) (uint64, error) {
	if s == "" || (len(s) > 1 && s[0] == '0') {
		return 0, fmt.Errorf("%q is not a plain decimal number", s)
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || n > max {
		return 0, fmt.Errorf("%q is not a number from 0 to %d", s, max)
	}
	return n, nil
}

// VdevName is the conventional name of a devid ("xvdb", "xvda1", "sdc"),
// or its decimal number when it has none. ParseVdev(VdevName(d)) == d.
func VdevName(devid uint32) string {
	var prefix string
	var disk, part uint32
	switch {
	case devid&extendedFlag != 0:
		if devid>>28 != 1 {
			return strconv.FormatUint(uint64(devid), 10)
		}
		disk, part = (devid>>8)&maxExtDisk, devid&0xff
		if disk < 16 && part < 16 {
			// That disk has a short form; this number is not its name.
			return strconv.FormatUint(uint64(devid), 10)
		}
		prefix = "xvd"
	case devid>>8 == xvdMajor:
		prefix, disk, part = "xvd", (devid>>4)&15, devid&15
	case devid>>8 == sdMajor:
		prefix, disk, part = "sd", (devid>>4)&15, devid&15
	case devid>>8 == hdMajor01 && (devid>>6)&3 < 2:
		prefix, disk, part = "hd", (devid>>6)&3, devid&63
	case devid>>8 == hdMajor23 && (devid>>6)&3 < 2:
		prefix, disk, part = "hd", (devid>>6)&3+2, devid&63
	default:
		return strconv.FormatUint(uint64(devid), 10)
	}
	name := prefix + letters(disk)
	if part != 0 {
		name += strconv.FormatUint(uint64(part), 10)
	}
	return name
}

// letters writes disk number n as a, b, ..., z, aa, ab, ...
func letters(n uint32) string {
	var b []byte
	for v := uint64(n) + 1; v > 0; v = (v - 1) / 26 {
		b = append([]byte{byte('a' + (v-1)%26)}, b...)
	}
	return string(b)
}
