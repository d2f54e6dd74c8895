package uring

import "sync"

// Pool lends Rings to concurrent callers, making them as needed up to a
// limit. Safe for concurrent use.
//
// Get never waits: with every ring lent it returns nil and the caller does
// its I/O with pread/pwrite, which is what it would do without io_uring
// at all. Rings are per Pool because each is made for a caller's burst;
// callers that submit whole batches need few.
type Pool struct {
	mu     sync.Mutex
	free   []*Ring
	made   int
	max    int
	closed bool
}

// NewPool returns a pool of at most max rings.
func NewPool(max int) *Pool { return &Pool{max: max} }

// Get lends a ring, or returns nil when none is free and no more may be
// made (or making one failed, or the pool is closed).
func (p *Pool) Get() *Ring {
	p.mu.Lock()
	if n := len(p.free); n > 0 {
		r := p.free[n-1]
		p.free = p.free[:n-1]
		p.mu.Unlock()
		return r
	}
	if p.closed || p.made >= p.max {
		p.mu.Unlock()
		return nil
	}
	p.made++
	p.mu.Unlock()
	r, err := New()
	if err != nil {
		p.mu.Lock()
		p.made--
		p.mu.Unlock()
		return nil
	}
	return r
}

// Put returns a ring Get lent.
func (p *Pool) Put(r *Ring) {
	p.mu.Lock()
	if p.closed || r.broken {
		p.made--
		p.mu.Unlock()
		r.Close()
		return
	}
	p.free = append(p.free, r)
	p.mu.Unlock()
}

// Close releases the free rings, and each lent one when it comes back.
func (p *Pool) Close() {
	p.mu.Lock()
	free := p.free
	p.free, p.closed = nil, true
	p.made -= len(free)
	p.mu.Unlock()
	for _, r := range free {
		r.Close()
	}
}
