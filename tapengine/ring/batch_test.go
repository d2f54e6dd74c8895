package ring

import (
	"bytes"
	"fmt"
	"sync"
	"testing"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/tapengine/blkif"
)

// batchImage is a memImage that takes batches, logging each call so a
// test sees what went in one and where the flushes fell; an op at poison
// fails.
type batchImage struct {
	*memImage
	poison int64
	mu     sync.Mutex
	log    []string
}

func (b *batchImage) Batch(ops []image.BatchOp) {
	b.mu.Lock()
	b.log = append(b.log, fmt.Sprintf("batch %d", len(ops)))
	b.mu.Unlock()
	for i := range ops {
		op := &ops[i]
		switch {
		case op.Off == b.poison:
			op.Err = fmt.Errorf("poisoned offset %d", op.Off)
		case op.Write:
			_, op.Err = b.WriteAt(op.Buf, op.Off)
		default:
			_, op.Err = b.ReadAt(op.Buf, op.Off)
		}
	}
}

func (b *batchImage) Flush() error {
	b.mu.Lock()
	b.log = append(b.log, "flush")
	b.mu.Unlock()
	return b.memImage.Flush()
}

// With Options.Batch, a ring batch's reads and writes go to the image in
// one Batch call per run between flushes (the flush after the writes
// before it, the reads after it); a failed op fails its request alone.
func TestBatchOption(t *testing.T) {
	mem := &memImage{data: make([]byte, 1<<20)}
	img := &batchImage{memImage: mem, poison: 5 * 8 * 512}
	h := newHarnessImage(t, blkif.X86_64, 0, mem, img, Options{Batch: true, Workers: 4})
	var reqs []blkif.Request
	for i := range 8 {
		copy(h.tr.grant(uint32(100+i), true), bytes.Repeat([]byte{byte(i + 1)}, 4096))
		// Two segments of one page each: two ops, or one where they join.
		reqs = append(reqs, rw(blkif.OpWrite, uint64(i), uint64(i*8), seg(uint32(100+i), 0, 3), seg(uint32(100+i), 4, 7)))
	}
	reqs = append(reqs, blkif.Request{Op: blkif.OpFlushDiskcache, ID: 8})
	for i := range 6 {
		h.tr.grant(uint32(200+i), false)
		reqs = append(reqs, rw(blkif.OpRead, uint64(9+i), uint64(i*8), seg(uint32(200+i), 0, 7)))
	}
	rsp := h.do(reqs...)
	for _, r := range rsp {
		want := int16(blkif.StatusOK)
		if r.ID == 5 || r.ID == 14 { // the write and the read at the poisoned offset
			want = blkif.StatusError
		}
		if r.Status != want {
			t.Fatalf("response %+v, want status %d", r, want)
		}
	}
	for i := range 5 {
		if h.tr.pages[uint32(200+i)][100] != byte(i+1) {
			t.Fatalf("read %d does not see write %d", i, i)
		}
	}
	img.mu.Lock()
	log := fmt.Sprint(img.log)
	img.mu.Unlock()
	if log != "[batch 8 flush batch 6]" && log != "[batch 16 flush batch 6]" {
		t.Fatalf("image calls %s, want the 8 writes in one batch, the flush, then the 6 reads", log)
	}
	if h.stats.Errors.Load() != 2 {
		t.Fatalf("%d errors counted, want 2", h.stats.Errors.Load())
	}
	// A long batch goes in submissions of publishEvery, each answered
	// (and published) before the next starts.
	img.mu.Lock()
	img.log = nil
	img.mu.Unlock()
	reqs = reqs[:0]
	for i := range 20 {
		reqs = append(reqs, rw(blkif.OpRead, uint64(100+i), uint64(i*8), seg(uint32(200+i%6), 0, 7)))
	}
	h.do(reqs...)
	img.mu.Lock()
	log = fmt.Sprint(img.log)
	img.mu.Unlock()
	if log != "[batch 8 batch 8 batch 4]" {
		t.Fatalf("20 reads went to the image as %s, want [batch 8 batch 8 batch 4]", log)
	}
}
