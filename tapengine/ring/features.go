package ring

import (
	"strconv"

	"github.com/blktap-go/blktap/tapengine/blkif"
)

// Features lists the xenstore keys a backend publishes for a ring served
// with these options (docs/WIRE.md, section "blkif feature keys"), as key/value pairs for the
// reconciler to write: probe before InitWait, connect in the transaction
// that moves the backend to Connected. tapengine never writes xenstore.
// Keys for a feature Serve does not do are left out: a backend that
// cannot do INDIRECT must not write feature-max-indirect-segments.
func (o Options) Features() (probe, connect [][2]string) {
	probe = append(probe, [2]string{"max-ring-page-order", strconv.Itoa(blkif.MaxRingOrder)})
	if n := min(o.MaxIndirectSegments, maxIndirectSegments); n > 0 {
		probe = append(probe, [2]string{"feature-max-indirect-segments", strconv.Itoa(n)})
	}
	connect = append(connect,
		[2]string{"feature-flush-cache", "1"},
		[2]string{"feature-barrier", "1"},
	)
	if o.Persistent {
		connect = append(connect, [2]string{"feature-persistent", "1"})
	}
	if o.Discard && !o.ReadOnly {
		connect = append(connect,
			[2]string{"feature-discard", "1"},
			[2]string{"discard-granularity", strconv.Itoa(blkif.SectorSize)},
			[2]string{"discard-alignment", "0"},
			[2]string{"discard-secure", "0"},
		)
	}
	return probe, connect
}
