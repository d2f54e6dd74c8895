package units

import (
	"errors"
	"testing"
)

func TestParseSize(t *testing.T) {
	good := map[string]int64{
		"0": 0, "123": 123, "123B": 123, "123b": 123, "100K": 100 << 10, "100k": 100 << 10,
		"512M": 512 << 20, "4G": 4 << 30, "4g": 4 << 30, "1T": 1 << 40, "2P": 2 << 50, "7E": 7 << 60,
		"1.5G": 3 << 29, "0.5K": 512, "4GiB": 4 << 30, "512MiB": 512 << 20, "1.25M": 1310720,
		"9223372036854775807": 1<<63 - 1,
	}
	for in, want := range good {
		if got, err := ParseSize(in); got != want || err != nil {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	bad := []string{"", "G", "-1", "+1", " 1G", "1G ", "1 G", "1GB", "1gb", "1X", "1.G", ".5G", "0.1K",
		"1.5", "1e3", "0x10", "8E", "9223372036854775808", "1Gi", "1GiBB", "1/2G", "１G"}
	for _, in := range bad {
		if n, err := ParseSize(in); !errors.Is(err, ErrBadSize) {
			t.Errorf("ParseSize(%q) = %d, %v; want ErrBadSize", in, n, err)
		}
	}
}

func TestFormatSize(t *testing.T) {
	for n, want := range map[int64]string{0: "0", 1: "1", 1023: "1023", 1024: "1K", 1536: "1536",
		3 << 29: "1536M", 4 << 30: "4G", 1 << 62: "4E", 1<<63 - 1: "9223372036854775807"} {
		if got := FormatSize(n); got != want {
			t.Errorf("FormatSize(%d) = %q, want %q", n, got, want)
		}
	}
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"4G", "1.5G", "123", "512MiB", "1GB", "9223372036854775807", "0.1K"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseSize(s)
		if err != nil {
			if !errors.Is(err, ErrBadSize) {
				t.Fatalf("ParseSize(%q): unclassified error %v", s, err)
			}
			return
		}
		if n < 0 {
			t.Fatalf("ParseSize(%q) = %d", s, n)
		}
		back, err := ParseSize(FormatSize(n))
		if err != nil || back != n {
			t.Fatalf("round trip %q -> %d -> %q -> %d, %v", s, n, FormatSize(n), back, err)
		}
	})
}
