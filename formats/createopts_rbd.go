package formats

import (
	"fmt"
	"strconv"

	"github.com/blktap-go/blktap/formats/rbd"
)

// rbdCreateKeys: qemu's rbd driver takes size and cluster_size (the
// object size); the rest are `rbd create`'s options under qemu-style
// names, so an image made here can be made as `rbd create` makes it.
var rbdCreateKeys = []createKey{
	keySize,
	withHelp(keyClusterSize, "RBD object size (a power of two, 4K to 32M; default 4M)"),
	withHelp(withKey(keyClusterSize, "object_size"), "Same as cluster_size (rbd create --object-size)"),
	{key: "order", kind: "num", help: "Object size as a power of two, 12 to 25 (rbd create --order)",
		set: func(co *CreateOptions, v string) error {
			n, err := strconv.Atoi(v)
			if err != nil || n < 12 || n > 25 {
				return fmt.Errorf("order %q: want 12 to 25", v)
			}
			co.ClusterSize = 1 << n
			return nil
		}},
	{key: "features", kind: "str", help: "Image features joined by '+': layering, exclusive-lock (required), object-map, fast-diff, deep-flatten, journaling (default: the pool's)",
		set: func(co *CreateOptions, v string) (err error) { co.Features, err = rbd.ParseFeatures(v); return err }},
	{key: "stripe_unit", kind: "size", help: "Bytes written to one object before the next (with stripe_count)",
		set: sizeKey(func(co *CreateOptions, n int64) { co.StripeUnit = n })},
	{key: "stripe_count", kind: "num", help: "Objects a stripe spans (with stripe_unit)",
		set: func(co *CreateOptions, v string) error {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n < 1 || n > 1<<20 {
				return fmt.Errorf("stripe_count %q: want 1 or more", v)
			}
			co.StripeCount = n
			return nil
		}},
	{key: "data_pool", kind: "str", help: "Pool for the image's data objects (an erasure-coded pool, say)",
		set: func(co *CreateOptions, v string) error { co.DataPool = v; return nil }},
}
