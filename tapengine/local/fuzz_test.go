package local

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/blktap-go/blktap/internal/corpus"
)

// FuzzAttach: whatever a memfd holds (header, flags, size) and whatever
// ring refs come with it, Attach either refuses with a clear error or
// gives a transport whose Page answers every ref without panicking.
func FuzzAttach(f *testing.F) {
	for _, b := range corpus.Files(f, "*.mem") {
		f.Add(b, uint32(1), uint8(1))
	}
	g, err := NewGrantTable(3)
	if err != nil {
		f.Fatal(err)
	}
	storeFlags(g.mem, 1, FlagGranted)
	storeFlags(g.mem, 2, FlagGranted|FlagReadOnly)
	good := append([]byte(nil), g.mem...)
	g.Close()
	f.Add(good, uint32(1), uint8(1))
	f.Add(good, uint32(2), uint8(1))
	f.Add(good[:4096], uint32(0), uint8(1))
	f.Fuzz(func(t *testing.T, mem []byte, ref uint32, nrefs uint8) {
		if len(mem) > 64*4096 {
			return
		}
		fd, err := unix.MemfdCreate("fuzz", unix.MFD_CLOEXEC)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := unix.Write(fd, mem); err != nil && len(mem) > 0 {
			t.Fatal(err)
		}
		kick, _ := unix.Eventfd(0, unix.EFD_CLOEXEC)
		notify, _ := unix.Eventfd(0, unix.EFD_CLOEXEC)
		refs := make([]uint32, nrefs%20)
		for i := range refs {
			refs[i] = ref + uint32(i)
		}
		tr, err := Attach(fd, refs, kick, notify)
		if err != nil {
			if !errors.Is(err, ErrBadMemory) && !errors.Is(err, ErrNotGranted) {
				t.Fatalf("unclassified error: %v", err)
			}
			return
		}
		defer tr.Close()
		if len(tr.Ring()) != len(refs)*4096 {
			t.Fatalf("ring of %d bytes for %d refs", len(tr.Ring()), len(refs))
		}
		for r := range uint32(70) {
			if p, err := tr.Page(r, r%2 == 0); err == nil && len(p) != 4096 {
				t.Fatalf("page %d of %d bytes", r, len(p))
			}
		}
	})
}
