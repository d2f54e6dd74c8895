package ring

import (
	"fmt"

	"github.com/blktap-go/blktap/formats/image"
)

// runBatch does the reads and writes of jobs that may overlap (no flush
// or barrier among them) as one image.Batcher call: with an io_uring
// image, one system call for the lot where the pool would make one
// pread/pwrite per segment. Discards, the only other kind here, run
// one by one before it.
func (s *server) runBatch(jobs []job) {
	ops := s.ops[:0]
	for i := range jobs {
		j := &jobs[i]
		if j.kind != kindRead && j.kind != kindWrite {
			s.exec(j)
			continue
		}
		for _, sg := range j.segs {
			ops = append(ops, image.BatchOp{Write: j.kind == kindWrite, Buf: sg.buf, Off: sg.off})
		}
	}
	s.batcher.Batch(ops)
	k := 0
	for i := range jobs {
		j := &jobs[i]
		if j.kind != kindRead && j.kind != kindWrite {
			continue
		}
		var err error
		for _, sg := range j.segs {
			if err == nil && ops[k].Err != nil {
				what := "read"
				if j.kind == kindWrite {
					what = "write"
				}
				err = fmt.Errorf("%s %d bytes at %d: %w", what, len(sg.buf), sg.off, ops[k].Err)
			}
			k++
		}
		s.finish(j, err)
	}
	// The guest's pages are unmapped once answered: keep no references.
	clear(ops)
	s.ops = ops[:0]
}
