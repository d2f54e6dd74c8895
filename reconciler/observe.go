package reconciler

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strconv"
	"strings"

	"github.com/blktap-go/blktap/tapengine/blkif"
	"github.com/blktap-go/blktap/xenstore"
)

// snapshot is one observation of a device in xenstore.
type snapshot struct {
	Observed
	request      *opRequest // the operator's request Observed.Request names
	name         string
	fePath       string
	feID         string
	ringRefs     []uint32
	ringOrder    int
	eventChannel uint32
	queues       []queueRing // blkif multi-queue (2 or more); nil: the classic keys
	protocol     string
	beSectors    uint64
	beSectorSize uint32
	beInfo       int
	beDiscard    bool
	nbdDevice    string
	fePersistent bool
	// offerPersistent: the daemon offers feature-persistent; grants stay
	// mapped only when the frontend takes it too.
	offerPersistent bool
	beMaxIndirect   int
	script          string // the hotplug script the toolstack runs for the device
	discard         bool   // discard-enable is not "0" (libxl's default is 1)
	phase           string // blktap/phase as xenstore has it
}

// testHookObserveRead, set by tests only, runs after observe reads each
// backend key: a test changes xenstore between two reads with it.
var testHookObserveRead func(key string)

// observe reads everything Plan and the effects need about one device in
// one xenstore transaction. Read one by one, the keys of a backend removed
// midway (a detach's last step) would look like a new device, online, in
// state Unknown, with the old params, whose image Plan opens again; in a
// transaction the reads are one view, and a commit that conflicts reads
// again.
func (d *Daemon) observe(ctx context.Context, dev *device) (snapshot, error) {
	var s snapshot
	err := d.xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		var err error
		s, err = d.readSnapshot(ctx, tx, dev.key)
		return err
	})
	if err != nil {
		return s, err
	}
	if s.fePath != "" {
		// After the transaction, which may run more than once: the watch
		// fires once when set, so a change missed meanwhile is not lost.
		d.watchFrontend(ctx, dev, s.fePath)
	}
	return s, nil
}

func (d *Daemon) readSnapshot(ctx context.Context, tx *xenstore.Tx, k Key) (snapshot, error) {
	var s snapshot
	be := d.backendPath(k)
	r := newDirReader(ctx, tx, be)
	r.onRead = testHookObserveRead
	if present, err := r.exists(); !present || err != nil {
		return s, err
	}
	s.Present = true
	readBackend(r, &s)
	if r.err != nil {
		return s, r.err
	}
	s.Domain0 = k.Domid == 0 && d.localFrontend
	s.LocalFrontend = d.localFrontend && !s.Domain0
	s.Export = s.Domain0 || !d.localFrontend
	s.offerPersistent = d.offerPersistent
	if s.fePath == "" {
		return s, nil
	}
	// The frontend path comes from the toolstack; the daemon only follows
	// it where a frontend of this device may live.
	if s.fePath != k.FrontendPath() {
		return s, fmt.Errorf("backend %s names frontend %q, want %s", be, s.fePath, k.FrontendPath())
	}
	return s, readFrontend(newDirReader(ctx, tx, s.fePath), &s)
}

// readBackend reads the toolstack's and the daemon's keys of the backend
// directory.
func readBackend(r *dirReader, s *snapshot) {
	r.prefetch("", statusDir)
	s.Params = r.get("params")
	s.Mode = r.get("mode")
	s.Online = r.get("online") != "0"
	s.Backend = ParseState(r.get("state"))
	s.HotplugConnected = r.get("hotplug-status") == "connected"
	s.script = r.get("script")
	s.HotplugScript = s.script != ""
	s.Declared = r.get(keySource) != ""
	s.discard = r.get("discard-enable") != "0"
	s.Cdrom = r.get("device-type") == "cdrom"
	s.fePath = r.get("frontend")
	s.feID = r.get("frontend-id")
	s.name = r.get(keyName)
	s.phase = r.get(keyPhase)
	s.nbdDevice = r.get(keyNBDDevice)
	s.beSectors, _ = strconv.ParseUint(r.get("sectors"), 10, 64)
	ss, _ := strconv.ParseUint(r.get("sector-size"), 10, 32)
	s.beSectorSize = uint32(ss)
	s.beInfo = atoiDefault(r.get("info"), 0)
	s.beDiscard = r.get("feature-discard") == "1"
	s.beMaxIndirect = max(0, atoiDefault(r.get("feature-max-indirect-segments"), 0))
}

// readFrontend reads the frontend's state and ring keys. Keys the backend
// cannot use are no error: they become s.FrontendError, which Plan turns
// into a fatal error for the frontend, as blkback does.
func readFrontend(r *dirReader, s *snapshot) error {
	if !r.has("state") {
		return r.err
	}
	r.prefetch("")
	feState := r.get("state")
	if r.err != nil {
		return r.err
	}
	s.FrontendPresent = true
	s.Frontend = ParseState(feState)
	s.protocol = r.get("protocol")
	s.fePersistent = r.get("feature-persistent") == "1"
	if r.get("device-type") == "cdrom" {
		s.Cdrom = true
	}
	hasOrder := r.has("ring-page-order")
	order := r.get("ring-page-order")
	ref := r.get("ring-ref")
	ev := r.get("event-channel")
	if r.err != nil {
		return r.err
	}
	if _, err := blkif.ParseProtocol(s.protocol); err != nil {
		s.FrontendError = fmt.Sprintf("protocol %q: want x86_32-abi, x86_64-abi or arm-abi", s.protocol)
		return nil
	}
	if !readRingRefs(r, s, hasOrder, order, ref) {
		return r.err
	}
	if p, err := strconv.ParseUint(ev, 10, 32); err == nil {
		s.eventChannel = uint32(p)
		s.RingPublished = len(s.ringRefs) > 0
	}
	if r.err == nil {
		readQueues(r, s, hasOrder)
	}
	return r.err
}

// readRingRefs reads the classic (single queue) ring refs; false when they
// are unusable and s.FrontendError says why.
func readRingRefs(r *dirReader, s *snapshot, hasOrder bool, order, ref string) bool {
	s.ringOrder = 0
	if hasOrder {
		n, err := strconv.Atoi(strings.TrimSpace(order))
		if err != nil || n < 0 || n > blkif.MaxRingOrder {
			s.FrontendError = fmt.Sprintf("ring-page-order %q: want 0..%d", order, blkif.MaxRingOrder)
			return false
		}
		s.ringOrder = n
	}
	// As blkback: with ring-page-order present (even "0") the refs are
	// ring-ref0..ring-ref(2^order-1); without it, one ring-ref.
	if !hasOrder {
		if ref == "" {
			return true
		}
		v, err := strconv.ParseUint(ref, 10, 32)
		if err != nil {
			s.FrontendError = fmt.Sprintf("ring-ref %q is not a number", ref)
			return false
		}
		s.ringRefs = []uint32{uint32(v)}
		return true
	}
	for i := 0; i < 1<<s.ringOrder; i++ {
		v := r.get(fmt.Sprintf("ring-ref%d", i))
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			if i > 0 || v != "" {
				s.FrontendError = fmt.Sprintf("ring-ref%d %q is missing or not a number", i, v)
			}
			s.ringRefs = nil
			break
		}
		s.ringRefs = append(s.ringRefs, uint32(n))
	}
	return true
}

// readQueues reads blkif multi-queue's queue-N/ directories, when the
// frontend asks for two or more.
func readQueues(r *dirReader, s *snapshot, hasOrder bool) {
	nq := r.get("multi-queue-num-queues")
	if nq == "" || r.err != nil {
		return
	}
	n, err := strconv.Atoi(nq)
	if err != nil || n < 1 || n > maxQueues() {
		s.FrontendError = fmt.Sprintf("multi-queue-num-queues %q: want 1..%d", nq, maxQueues())
		s.RingPublished = true // so the error is reported
		return
	}
	if n < 2 {
		return
	}
	s.RingPublished = true
	for i := range n {
		q, qerr := readQueue(r.get, fmt.Sprintf("queue-%d/", i), s.ringOrder, hasOrder)
		if qerr != "" {
			s.FrontendError = qerr
			return
		}
		s.queues = append(s.queues, q)
	}
}

// dirReader reads keys below one directory in a transaction. It lists a
// directory before reading in it, so a key that is not there costs no
// round trip (most of a backend's keys are missing until it connects);
// the first error sticks and later reads return "".
type dirReader struct {
	ctx    context.Context
	tx     *xenstore.Tx
	dir    string
	listed map[string]map[string]bool // relative directory -> its children
	cache  map[string]string          // key -> value, read ahead by prefetch
	err    error
	onRead func(key string) // testHookObserveRead, for the backend's keys
}

func newDirReader(ctx context.Context, tx *xenstore.Tx, dir string) *dirReader {
	return &dirReader{ctx: ctx, tx: tx, dir: dir, listed: map[string]map[string]bool{}, cache: map[string]string{}}
}

// prefetch reads every key of the directories rels ("" is the reader's
// own) in one batch, so that the gets after it cost no round trip: one
// observation is then a handful of round trips, not one per key, which
// is most of what a device's convergence waits for on a busy host
// (docs/PERFORMANCE.md, "Convergence"). It reads the values of
// subdirectories too (empty, and harmless).
func (r *dirReader) prefetch(rels ...string) {
	var keys, paths []string
	for _, rel := range rels {
		for name := range r.children(rel) {
			k := name
			if rel != "" {
				k = rel + "/" + name
			}
			keys, paths = append(keys, k), append(paths, r.dir+"/"+k)
		}
	}
	if r.err != nil || len(keys) == 0 {
		return
	}
	vals, errs := r.tx.ReadMany(r.ctx, paths)
	for i, k := range keys {
		switch {
		case errs[i] == nil:
			r.cache[k] = vals[i]
		case errors.Is(errs[i], xenstore.ErrNotFound):
			r.cache[k] = ""
		case r.err == nil:
			r.err = errs[i]
		}
	}
}

// exists lists the directory itself: false when it is gone.
func (r *dirReader) exists() (bool, error) {
	r.children("")
	return r.listed[""] != nil, r.err
}

// children lists rel (relative to the reader's directory) once; a missing
// directory has no children and a nil set.
func (r *dirReader) children(rel string) map[string]bool {
	if kids, ok := r.listed[rel]; ok || r.err != nil {
		return kids
	}
	var kids map[string]bool
	parent, name := splitRel(rel)
	if rel == "" || r.children(parent)[name] {
		p := r.dir
		if rel != "" {
			p += "/" + rel
		}
		names, err := r.tx.Directory(r.ctx, p)
		switch {
		case errors.Is(err, xenstore.ErrNotFound):
		case err != nil:
			r.err = err
			return nil
		default:
			kids = make(map[string]bool, len(names))
			for _, n := range names {
				kids[n] = true
			}
		}
	}
	r.listed[rel] = kids
	return kids
}

func (r *dirReader) has(key string) bool {
	parent, name := splitRel(key)
	return r.children(parent)[name]
}

// get reads key, "" when it is missing.
func (r *dirReader) get(key string) string {
	v, cached := r.cache[key]
	if !cached && r.has(key) {
		var err error
		v, err = r.tx.Read(r.ctx, r.dir+"/"+key)
		if err != nil && !errors.Is(err, xenstore.ErrNotFound) && r.err == nil {
			r.err = err
		}
	}
	if r.onRead != nil {
		r.onRead(key)
	}
	if r.err != nil {
		return ""
	}
	return v
}

func splitRel(rel string) (parent, name string) {
	if i := strings.LastIndexByte(rel, '/'); i >= 0 {
		return rel[:i], rel[i+1:]
	}
	return "", rel
}

// queueRing is one blkif queue: its ring refs and event channel.
type queueRing struct {
	refs   []uint32
	evtchn uint32
}

// maxQueues is what the backend offers (multi-queue-max-queues): one per
// CPU, at most the worker's limit.
func maxQueues() int { return min(runtime.NumCPU(), 16) }

// readQueue reads PREFIXring-ref (or ring-refN) and PREFIXevent-channel;
// a problem comes back as text for the device's status.
func readQueue(get func(string) string, prefix string, order int, hasOrder bool) (queueRing, string) {
	var q queueRing
	if !hasOrder {
		r, err := strconv.ParseUint(get(prefix+"ring-ref"), 10, 32)
		if err != nil {
			return q, prefix + "ring-ref is missing or not a number"
		}
		q.refs = []uint32{uint32(r)}
	} else {
		for i := 0; i < 1<<order; i++ {
			r, err := strconv.ParseUint(get(fmt.Sprintf("%sring-ref%d", prefix, i)), 10, 32)
			if err != nil {
				return q, fmt.Sprintf("%sring-ref%d is missing or not a number", prefix, i)
			}
			q.refs = append(q.refs, uint32(r))
		}
	}
	ev, err := strconv.ParseUint(get(prefix+"event-channel"), 10, 32)
	if err != nil {
		return q, prefix + "event-channel is missing or not a number"
	}
	q.evtchn = uint32(ev)
	return q, ""
}

func (d *Daemon) watchFrontend(ctx context.Context, dev *device, path string) {
	if dev.feWatch != nil && dev.fePath == path {
		return
	}
	if dev.feWatch != nil {
		dev.feWatch.Close()
		dev.feWatch = nil
	}
	w, err := d.xs.Watch(ctx, path, "frontend-"+dev.key.String())
	if err != nil {
		d.log.Warn("watch frontend", "path", path, "err", err)
		return
	}
	dev.feWatch, dev.fePath = w, path
	k := dev.key
	go func() {
		for range w.Events() {
			d.q.Add(k)
		}
	}()
}
