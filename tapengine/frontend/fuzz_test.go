package frontend

import (
	"encoding/binary"
	"errors"
	"log/slog"
	"testing"

	"github.com/blktap-go/blktap/internal/corpus"
	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/ring"
)

// FuzzResponses: a backend writes arbitrary bytes as responses and an
// arbitrary rsp_prod. The frontend's collection must not panic: it
// completes only requests in flight, at most once each, or reports the
// backend hostile. Input: byte 0 = protocol, 1 = requests in flight,
// 2..5 = rsp_prod, then the ring slots (112 or 108 bytes each).
func FuzzResponses(f *testing.F) {
	for _, b := range corpus.Files(f, "*.rsp") {
		f.Add(b)
	}
	f.Add([]byte{1, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < 6 {
			return
		}
		proto := blkif.X86_32
		if b[0]&1 != 0 {
			proto = blkif.X86_64
		}
		fr, err := New(Options{Protocol: proto, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		defer fr.Close()
		inflight := int(b[1]) % 33
		fr.mu.Lock()
		defer fr.mu.Unlock()
		for i := range inflight {
			req := blkif.Request{Op: blkif.OpFlushDiskcache, ID: uint64(i)}
			if err := fr.front.Push(&req); err != nil {
				t.Fatal(err)
			}
			fr.tags[i].busy = true
		}
		fr.front.PushRequests()
		r := fr.gt.Memory(fr.rings, 1)
		copy(r[blkif.RingHeaderSize:], b[6:])
		binary.LittleEndian.PutUint32(r[blkif.OffRspProd:], binary.LittleEndian.Uint32(b[2:]))
		seen := map[uint16]bool{}
		var batch []reaped
		batch, err = fr.collectLocked(batch)
		for _, d := range batch {
			if seen[d.id] || int(d.id) >= inflight {
				t.Fatalf("completed id %d twice or never sent", d.id)
			}
			seen[d.id] = true
		}
		if err != nil && !errors.Is(err, ring.ErrHostile) {
			t.Fatalf("unclassified error: %v", err)
		}
	})
}
