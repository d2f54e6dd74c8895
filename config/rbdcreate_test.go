package config

import (
	"reflect"
	"strings"
	"testing"

	"github.com/blktap-go/blktap/internal/rbdspec"
)

func rbdDisk(create string) []byte {
	return []byte("disks:\n  - {name: a, format: rbd, image: rbd/vm1, device: xvdb, create: " + create + "}\n")
}

func TestRBDCreateOptions(t *testing.T) {
	good := []struct {
		create string
		want   rbdspec.CreateOptions
	}{
		{"{size: 1G}", rbdspec.CreateOptions{Size: 1 << 30}},
		{"{size: 1G, object-size: 8M, features: [layering, exclusive-lock, object-map, fast-diff], stripe-unit: 64K, stripe-count: 16, data-pool: ec}",
			rbdspec.CreateOptions{Size: 1 << 30, ObjectSize: 8 << 20, Features: []string{"layering", "exclusive-lock", "object-map", "fast-diff"},
				StripeUnit: 64 << 10, StripeCount: 16, DataPool: "ec"}},
		{"{size: 1G, order: 23, features: layering+exclusive-lock}",
			rbdspec.CreateOptions{Size: 1 << 30, ObjectSize: 8 << 20, Features: []string{"layering", "exclusive-lock"}}},
		{"{size: 1G, cluster-size: 65536}", rbdspec.CreateOptions{Size: 1 << 30, ObjectSize: 64 << 10}},
	}
	for _, c := range good {
		f, err := Parse("x.yaml", rbdDisk(c.create))
		if err != nil {
			t.Errorf("%s: %v", c.create, err)
			continue
		}
		if got := f.Disks[0].Create.RBD; !reflect.DeepEqual(got, c.want) {
			t.Errorf("%s: got %+v, want %+v", c.create, got, c.want)
		}
	}
	bad := []struct{ create, want string }{
		{"{size: 1G, object-size: 3M}", "object size 3145728: want a power of two from 4K to 32M"},
		{"{size: 1G, object-size: 64M}", "want a power of two from 4K to 32M"},
		{"{size: 1G, order: 26}", "order must be an integer from 12 to 25, not 26"},
		{"{size: 1G, order: 22, object-size: 4M}", "object-size, cluster-size and order name one thing"},
		{"{size: 1G, features: [layering, dedup]}", `unknown rbd feature "dedup"`},
		{"{size: 1G, features: []}", "features is empty"},
		{"{size: 1G, features: [layering]}", "features without exclusive-lock"},
		{"{size: 1G, features: [exclusive-lock, fast-diff]}", "rbd feature fast-diff needs object-map"},
		{"{size: 1G, stripe-unit: 64K}", "stripe_unit and stripe_count go together"},
		{"{size: 1G, stripe-unit: 3K, stripe-count: 2}", "must be a multiple of 4K that divides the object size"},
		{"{size: 1G, stripe-unit: 8M, stripe-count: 2}", "must be a multiple of 4K that divides the object size (4194304)"},
		{"{size: 1G, stripe-count: 0, stripe-unit: 4K}", "stripe-count must be an integer from 1"},
		{"{size: 1G, data-pool: ''}", "data-pool is empty"},
		{"{size: 1G, data-pool: [a]}", "data-pool must be a string"},
	}
	for _, c := range bad {
		_, err := Parse("x.yaml", rbdDisk(c.create))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want an error containing %q", c.create, err, c.want)
		}
	}
	raw := []byte("disks:\n  - {name: a, format: raw, image: /a.raw, device: xvdb, create: {size: 1G, object-size: 4M}}\n")
	if _, err := Parse("x.yaml", raw); err == nil || !strings.Contains(err.Error(), "object-size is an rbd image's option; a raw disk does not take it") {
		t.Errorf("raw disk with object-size: %v", err)
	}
}
