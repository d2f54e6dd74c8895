package xen

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/tapengine/ring"
)

const pageSize = blkif.PageSize

// Limits.
const (
	// DefaultMaxPersistent is how many grants a transport keeps mapped
	// for a frontend with feature-persistent (Linux blkback's default
	// max_persistent_grants).
	DefaultMaxPersistent = 1056
	// domidFirstReserved is DOMID_FIRST_RESERVED (xen.h): ids from here
	// on name no guest.
	domidFirstReserved = 0x7ff0
	// maxPort bounds event channel ports (the FIFO ABI's 2^17).
	maxPort = 1 << 17
	// maxRingPages is 2^blkif.MaxRingOrder.
	maxRingPages = 1 << blkif.MaxRingOrder
	// evictPercent of the persistent cache goes at a release point when
	// the cache is full and refs missed it since the last one.
	evictPercent = 10
)

// Options are the ring's transport parameters, as the reconciler read
// them from the frontend's xenstore directory.
type Options struct {
	// Domid is the frontend's domain.
	Domid uint32
	// RingRefs are ring-ref (one page) or ring-ref0..N-1 (N = 2^order,
	// order <= 4), mapped in this order into one contiguous ring.
	RingRefs []uint32
	// EventChannel is the frontend's port (its event-channel key).
	EventChannel uint32
	// PersistentGrants: the frontend wrote feature-persistent=1, so it
	// reuses the same refs and expects the backend to keep them mapped.
	PersistentGrants bool
	// MaxPersistent bounds the persistent cache; 0 means
	// DefaultMaxPersistent.
	MaxPersistent int
	// MaxTransient bounds this transport's live per-request mappings; 0
	// leaves only the budget all transports of the process share (a
	// quarter of vm.max_map_count, at most 16384: see limit.go).
	MaxTransient int
	// Logger; nil means slog.Default().
	Logger *slog.Logger

	budget *mapBudget // nil: the process's; tests give their own
}

// Stats are a transport's mapping counters.
type Stats struct {
	Maps, Unmaps         uint64 // device map and unmap calls for data pages
	Hits                 uint64 // Page answered from the persistent cache
	Persistent           int    // live cached mappings
	Transient            int    // live per-request mappings
	Evictions            uint64 // cached mappings dropped to make room
	Events, StrayEvents  uint64 // ports read by Ack: ours, and others
	Copies, CopyFailures uint64 // grant copy calls (one per request), and failed ones
}

// Transport is the ring.Transport over a Device. Safe for concurrent
// use, but Close must come after the ring loop using it has returned.
type Transport struct {
	log   *slog.Logger
	opts  Options
	ringM Mapping
	port  uint32

	mu        sync.Mutex
	dev       Device // nil once closed
	ringRefs  map[uint32]bool
	cache     map[uint32]*list.Element // of *cached
	lru       list.List                // front = most recently used
	transient []Mapping
	budget    *mapBudget // holds len(transient)+reserved of ours
	reserved  int        // taken from budget by ReservePages, not yet mapped
	missFull  bool       // a ref missed the cache because it was full
	stats     Stats
	ports     [64]uint32
	one       [1]uint32 // the ref of a one-page MapGrants, without an allocation
	copy      bool      // no persistent grants: data moves by grant copy (gntcopy.go)
}

type cached struct {
	ref      uint32
	m        Mapping
	writable bool
}

var (
	_ ring.PageReserver = (*Transport)(nil)
	_ ring.Copier       = (*Transport)(nil)
)

// Attach maps the frontend's ring and binds its event channel. It takes
// ownership of dev: Close closes it, and so does a failed Attach.
func Attach(dev Device, opts Options) (ring.Transport, error) {
	t, err := attach(dev, opts)
	if err != nil {
		return nil, err
	}
	return t, nil
}

func attach(dev Device, opts Options) (_ *Transport, err error) {
	if dev == nil {
		return nil, fmt.Errorf("%w: no device", ErrBadOptions)
	}
	defer func() {
		if err != nil {
			err = errors.Join(err, dev.Close())
		}
	}()
	if err := opts.validate(); err != nil {
		return nil, err
	}
	if opts.MaxPersistent <= 0 {
		opts.MaxPersistent = DefaultMaxPersistent
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	t := &Transport{log: opts.Logger, opts: opts, dev: dev, budget: opts.budget,
		ringRefs: make(map[uint32]bool, len(opts.RingRefs)), cache: map[uint32]*list.Element{}}
	if t.budget == nil {
		t.budget = processMaps()
	}
	for _, r := range opts.RingRefs {
		t.ringRefs[r] = true
	}
	t.opts.RingRefs = append([]uint32(nil), opts.RingRefs...)
	t.ringM, err = dev.MapGrants(opts.Domid, opts.RingRefs, true)
	if err != nil {
		return nil, fmt.Errorf("xen: map ring of domain %d: %w", opts.Domid, err)
	}
	if len(t.ringM.Mem) != len(opts.RingRefs)*pageSize {
		err := fmt.Errorf("xen: ring mapping of %d bytes for %d refs", len(t.ringM.Mem), len(opts.RingRefs))
		return nil, errors.Join(err, dev.Unmap(t.ringM))
	}
	t.port, err = dev.BindInterdomain(opts.Domid, opts.EventChannel)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("xen: bind event channel of domain %d: %w", opts.Domid, err), dev.Unmap(t.ringM))
	}
	if !opts.PersistentGrants {
		t.probeCopy(dev)
		// Without grant copy: correct (pages are unmapped before each
		// response is published) but a map and an unmap per page, worth a
		// note when a guest is slow.
		how := "every data page is mapped per request"
		if t.copy {
			how = "data is copied per request (grant copy)"
		}
		t.log.Info("xen: no persistent grants; "+how, "domid", opts.Domid)
	}
	return t, nil
}

func (o *Options) validate() error {
	if o.Domid >= domidFirstReserved {
		return fmt.Errorf("%w: domain %d is a reserved id", ErrBadOptions, o.Domid)
	}
	n := len(o.RingRefs)
	if n == 0 || n > maxRingPages || n&(n-1) != 0 {
		return fmt.Errorf("%w: %d ring refs (want 2^order, order 0..%d)", ErrBadOptions, n, blkif.MaxRingOrder)
	}
	seen := make(map[uint32]bool, n)
	for i, r := range o.RingRefs {
		if seen[r] {
			return fmt.Errorf("%w: ring-ref%d %d repeats an earlier ring ref", ErrBadOptions, i, r)
		}
		seen[r] = true
	}
	// Xen never allocates port 0.
	if o.EventChannel == 0 || o.EventChannel >= maxPort {
		return fmt.Errorf("%w: event channel %d outside 1..%d", ErrBadOptions, o.EventChannel, maxPort-1)
	}
	if o.MaxPersistent < 0 || o.MaxTransient < 0 {
		return fmt.Errorf("%w: negative mapping limits", ErrBadOptions)
	}
	return nil
}

// Ring is the frontend's ring pages, mapped contiguously and writable.
func (t *Transport) Ring() []byte { return t.ringM.Mem }

// LocalPort is the local end of the bound event channel.
func (t *Transport) LocalPort() uint32 { return t.port }

// Page maps data page ref. With persistent grants it answers from the
// cache, or maps and caches the page (writable when the frontend granted
// it so, as blkfront does for persistent grants); when the cache is full,
// or without persistent grants, it maps the page for this request only:
// such a mapping lives until the next release point (ReleasePages, Ack or
// Notify), not until Close.
func (t *Transport) Page(ref uint32, writable bool) ([]byte, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.dev == nil {
		return nil, ErrClosed
	}
	// The guest naming its own ring as a data page would let a read
	// overwrite the indices the loop is using.
	if t.ringRefs[ref] {
		return nil, fmt.Errorf("%w: ref %d is a ring page", ErrNotGranted, ref)
	}
	if t.opts.PersistentGrants {
		if p, ok, err := t.cachedLocked(ref, writable); ok || err != nil {
			return p, err
		}
	}
	// Never wait here: only the ring loop that called us can release
	// our pages, and rings holding pages while waiting for each other's
	// could wait forever. ErrPagesBusy makes the loop release, then wait
	// in ReservePages holding nothing.
	if t.opts.MaxTransient > 0 && len(t.transient) >= t.opts.MaxTransient {
		return nil, fmt.Errorf("%w: %w: %d live per-request mappings", ring.ErrPagesBusy, ErrTooManyMappings, len(t.transient))
	}
	reserved := t.reserved > 0
	if reserved {
		t.reserved--
	} else if !t.budget.tryTake(1) {
		return nil, fmt.Errorf("%w: %w: the process's %d per-request mappings are in use",
			ring.ErrPagesBusy, ErrTooManyMappings, t.budget.size)
	}
	t.one[0] = ref
	m, err := t.dev.MapGrants(t.opts.Domid, t.one[:], writable)
	if err != nil {
		if reserved {
			t.reserved++
		} else {
			t.budget.give(1)
		}
		return nil, err
	}
	t.stats.Maps++
	t.transient = append(t.transient, m)
	return page(m), nil
}

// cachedLocked answers from the persistent cache, filling it on a miss
// while there is room. ok false and no error means: map transiently.
func (t *Transport) cachedLocked(ref uint32, writable bool) (_ []byte, ok bool, _ error) {
	if e, ok := t.cache[ref]; ok {
		c := e.Value.(*cached)
		if c.writable || !writable {
			t.lru.MoveToFront(e)
			t.stats.Hits++
			return page(c.m), true, nil
		}
		// Cached read-only, wanted writable: the grant is read-only, so
		// the transient map fails as it should (unless the frontend
		// re-granted it writable meanwhile).
		return nil, false, nil
	}
	if len(t.cache) >= t.opts.MaxPersistent {
		t.missFull = true
		return nil, false, nil
	}
	// Persistent pages are reused for reads and writes alike, so map
	// writable when the grant allows it.
	w := true
	t.one[0] = ref
	m, err := t.dev.MapGrants(t.opts.Domid, t.one[:], true)
	if err != nil && !writable {
		w = false
		m, err = t.dev.MapGrants(t.opts.Domid, t.one[:], false)
	}
	if err != nil {
		return nil, false, err
	}
	t.stats.Maps++
	t.cache[ref] = t.lru.PushFront(&cached{ref: ref, m: m, writable: w})
	return page(m), true, nil
}

func page(m Mapping) []byte { return m.Mem[:pageSize:pageSize] }

// ReleasePages unmaps every per-request mapping, gives back what
// ReservePages reserved and, when the persistent cache is full and refs
// have missed it, evicts its least recently used tenth. Call it only
// when no request is in flight: every page handed out by Page since the
// last release becomes invalid. ring.Serve calls it before it publishes
// responses; Ack and Notify do too.
func (t *Transport) ReleasePages() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.releaseLocked()
}

func (t *Transport) releaseLocked() error {
	if t.dev == nil {
		return nil
	}
	var errs []error
	for _, m := range t.transient {
		errs = append(errs, t.dev.Unmap(m))
		t.stats.Unmaps++
	}
	t.budget.give(len(t.transient) + t.reserved)
	clear(t.transient)
	t.transient = t.transient[:0]
	t.reserved = 0
	if t.missFull && len(t.cache) >= t.opts.MaxPersistent {
		n := max(1, len(t.cache)*evictPercent/100)
		for range n {
			e := t.lru.Back()
			c := t.lru.Remove(e).(*cached)
			delete(t.cache, c.ref)
			errs = append(errs, t.dev.Unmap(c.m))
			t.stats.Unmaps++
			t.stats.Evictions++
		}
	}
	t.missFull = false
	return errors.Join(errs...)
}

// ReservePages waits until n more per-request mappings fit in the
// process's budget (and MaxTransient) and keeps them for this transport
// until the next release point; Page draws on them first. Call it only
// right after a release point, holding no per-request mapping: a
// transport that waited while holding some could deadlock with another
// doing the same. It fails if n can never fit, when ctx is done, or
// after a long wait (an image stuck in I/O elsewhere).
func (t *Transport) ReservePages(ctx context.Context, n int) error {
	t.mu.Lock()
	if t.dev == nil {
		t.mu.Unlock()
		return ErrClosed
	}
	if held := len(t.transient) + t.reserved; held > 0 {
		t.mu.Unlock()
		return fmt.Errorf("xen: reserve %d pages while holding %d", n, held)
	}
	limit := t.budget.size
	if t.opts.MaxTransient > 0 {
		limit = min(limit, t.opts.MaxTransient)
	}
	t.mu.Unlock()
	if n <= 0 {
		return nil
	}
	if n > limit {
		return fmt.Errorf("%w: a request needs %d per-request mappings, more than the %d allowed", ErrTooManyMappings, n, limit)
	}
	if !t.budget.take(ctx, n, reserveWait) {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("xen: waiting for %d per-request mappings: %w", n, err)
		}
		return fmt.Errorf("%w: no %d per-request mappings free after %v", ErrTooManyMappings, n, reserveWait)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.dev == nil {
		t.budget.give(n)
		return ErrClosed
	}
	t.reserved += n
	return nil
}

// WaitFD is the evtchn descriptor: readable when the frontend signalled.
func (t *Transport) WaitFD() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.dev == nil {
		return -1
	}
	return t.dev.EventFD()
}

// Ack reads the ports that fired and unmasks ours, so the next signal
// wakes the loop again. It is also a release point: ring.Serve calls it
// at the top of its loop, when every request it consumed is answered.
func (t *Transport) Ack() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.dev == nil {
		return ErrClosed
	}
	fired := false
	for {
		n, err := t.dev.ReadPorts(t.ports[:])
		if err != nil {
			return err
		}
		for _, p := range t.ports[:n] {
			if p == t.port {
				fired = true
				t.stats.Events++
			} else {
				// Only our port is bound on this fd; anything else is a
				// driver oddity, worth a note but no action.
				t.stats.StrayEvents++
				t.log.Debug("xen: event on an unbound port", "port", p, "ours", t.port)
			}
		}
		if n < len(t.ports) {
			break
		}
	}
	// Unmask after reading: a signal that comes between the read and the
	// unmask stays pending in the hypervisor and fires on unmask.
	if fired {
		if err := t.dev.Unmask(t.port); err != nil {
			return err
		}
	}
	return t.releaseLocked()
}

// Notify signals the frontend. It is also a release point: ring.Serve
// calls it right after publishing a batch's responses.
func (t *Transport) Notify() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.dev == nil {
		return ErrClosed
	}
	if err := t.dev.Notify(t.port); err != nil {
		return err
	}
	return t.releaseLocked()
}

// Stats returns the mapping counters.
func (t *Transport) Stats() Stats {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.stats
	s.Persistent, s.Transient = len(t.cache), len(t.transient)
	return s
}

// Close unmaps every data page and the ring, unbinds the port and closes
// the device. Calling it again does nothing.
func (t *Transport) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.dev == nil {
		return nil
	}
	var errs []error
	for _, m := range t.transient {
		errs = append(errs, t.dev.Unmap(m))
	}
	t.budget.give(len(t.transient) + t.reserved)
	t.transient, t.reserved = nil, 0
	for e := t.lru.Front(); e != nil; e = e.Next() {
		errs = append(errs, t.dev.Unmap(e.Value.(*cached).m))
	}
	t.lru.Init()
	t.cache = nil
	errs = append(errs, t.dev.Unmap(t.ringM), t.dev.Unbind(t.port), t.dev.Close())
	t.ringM = Mapping{}
	t.dev = nil
	return errors.Join(errs...)
}
