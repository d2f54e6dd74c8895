package ring

import (
	"sync"

	"github.com/blktap-go/blktap/tapengine/blkif"
)

// pool runs the I/O of a batch on a few long-lived goroutines, so a batch
// of requests to a slow image overlaps instead of queueing on the loop.
// Goroutines are started once per Serve, never per request.
type pool struct {
	jobs chan *job
	wg   sync.WaitGroup // jobs of the current batch
	s    *server
	done sync.WaitGroup // the goroutines
}

func newPool(n int) *pool {
	p := &pool{jobs: make(chan *job, 1024)}
	p.done.Add(n)
	for range n {
		go func() {
			defer p.done.Done()
			for j := range p.jobs {
				p.s.exec(j)
				p.wg.Done()
			}
		}()
	}
	return p
}

func (p *pool) close() {
	close(p.jobs)
	p.done.Wait()
}

// run executes jobs concurrently, the calling thread taking its share.
func (p *pool) run(jobs []job) {
	if len(jobs) == 1 {
		p.s.exec(&jobs[0])
		return
	}
	p.wg.Add(len(jobs) - 1)
	for i := 1; i < len(jobs); i++ {
		p.jobs <- &jobs[i]
	}
	p.s.exec(&jobs[0])
	p.wg.Wait()
}

// publishEvery: a long batch publishes its responses every this many
// requests (the pool-less loop, and a Batcher's submissions).
const publishEvery = 8

// serveBatch consumes n requests and writes their responses (the last
// ones not yet published).
func (s *server) serveBatch(n int) error {
	if cap(s.batch) < n {
		// Pending never reports more than a ring, so this cannot happen;
		// refuse to grow on a peer's say-so regardless.
		n = cap(s.batch)
	}
	jobs := s.batch[:n]
	var r blkif.Request
	if s.pool == nil && s.batcher == nil {
		for i := range jobs {
			s.back.Next(&r)
			if !s.prepare(&r, &jobs[i]) {
				// Every earlier job is answered: publishing releases
				// their pages.
				if err := s.publish(); err != nil {
					return err
				}
				if err := s.prepareReserved(&r, &jobs[i]); err != nil {
					return err
				}
			}
			s.exec(&jobs[i])
			s.respond(&jobs[i])
			if (i+1)%publishEvery == 0 && i+1 < len(jobs) {
				// Let the frontend take these while we do the rest: the
				// two sides overlap instead of taking turns by batch.
				if err := s.publish(); err != nil {
					return err
				}
			}
		}
		return nil
	}
	start := 0 // first job not yet run
	for i := range jobs {
		s.back.Next(&r)
		if !s.prepare(&r, &jobs[i]) {
			// Answer what is prepared, so publishing releases its
			// pages, then map this one again.
			s.runJobs(jobs[start:i])
			start = i
			if err := s.publish(); err != nil {
				return err
			}
			if err := s.prepareReserved(&r, &jobs[i]); err != nil {
				return err
			}
		}
		if s.batcher != nil && i+1-start == publishEvery && i+1 < len(jobs) {
			// As the pool-less loop does: the frontend takes these
			// answers while the next submission runs.
			s.runJobs(jobs[start : i+1])
			start = i + 1
			if err := s.publish(); err != nil {
				return err
			}
		}
	}
	s.runJobs(jobs[start:])
	return nil
}

// runJobs executes prepared jobs on the pool and writes their responses.
func (s *server) runJobs(jobs []job) {
	// Run the jobs between ordering points concurrently; a flush or a
	// barrier runs alone after everything before it.
	start := 0
	for i := range jobs {
		if jobs[i].ordered() {
			if i > start {
				s.overlap(jobs[start:i])
			}
			s.exec(&jobs[i])
			start = i + 1
		}
	}
	if start < len(jobs) {
		s.overlap(jobs[start:])
	}
	for i := range jobs {
		s.respond(&jobs[i])
	}
}

// overlap runs jobs that may overlap: as one batch, or on the pool.
func (s *server) overlap(jobs []job) {
	if s.batcher != nil {
		s.runBatch(jobs)
		return
	}
	s.pool.run(jobs)
}

func (s *server) respond(j *job) {
	if j.status != blkif.StatusOK && j.kind == kindNone {
		s.stats.Errors.Add(1)
	}
	s.back.Respond(&blkif.Response{ID: j.id, Op: j.op, Status: j.status})
}
