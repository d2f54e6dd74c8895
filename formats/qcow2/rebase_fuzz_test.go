package qcow2

import (
	"bytes"
	"testing"
)

// FuzzPatchBacking: for any header readHeader accepts, the first cluster
// patchBacking makes for a new backing name and format must parse again
// with exactly that name and format, the same tables and features, and
// as many extensions of other kinds as before (none lost, none made up).
func FuzzPatchBacking(f *testing.F) {
	seedCorpus(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := readHeader(bytes.NewReader(data), maxFileSize)
		if err != nil {
			return
		}
		cs := 1 << h.clusterBits
		if len(data) < cs {
			data = append(bytes.Clone(data), make([]byte, cs-len(data))...)
		}
		for _, nb := range [][2]string{{"new.qcow2", "qcow2"}, {"", ""}, {string(bytes.Repeat([]byte("n"), 1000)), "raw"}} {
			neu, extEnd, err := patchBacking(data[:cs], h, nb[0], nb[1])
			if err != nil {
				continue // does not fit in this cluster: refused, nothing written
			}
			h2, err := readHeader(bytes.NewReader(neu), maxFileSize)
			if err != nil {
				t.Fatalf("patched header does not parse: %v", err)
			}
			if h2.backingName != nb[0] || h2.backingFormat != nb[1] {
				t.Fatalf("backing %q %q, want %q %q", h2.backingName, h2.backingFormat, nb[0], nb[1])
			}
			if h2.extensionsEnd != extEnd {
				t.Fatalf("extensions end at %d, patchBacking said %d", h2.extensionsEnd, extEnd)
			}
			if h2.version != h.version || h2.size != h.size || h2.l1Offset != h.l1Offset ||
				h2.refTableOffset != h.refTableOffset || h2.incompatible != h.incompatible ||
				h2.headerLength != h.headerLength || h2.unknownExtensions != h.unknownExtensions ||
				h2.hasBitmaps != h.hasBitmaps || len(h2.featureNames) != len(h.featureNames) {
				t.Fatalf("header changed beyond the backing file:\n%+v\n%+v", h, h2)
			}
		}
	})
}
