package nbd

// engine is where the reader sends each request it has read: the one
// request path of a connection. The reader starts a request on it, and
// the engine answers it, now or later, through send. conn, read and
// command never ask which kind of backend they serve; the engine chosen
// in newConn knows.
//
// Two engines exist. syncEngine serves a plain Backend (an image.Image in
// a worker process): it runs small requests inline on the reader, whose
// replies wait for the reader's next flush, and hands the rest to the
// connection's worker pool. asyncEngine serves an AsyncBackend (the local
// frontend's guest view): it starts aligned READs and WRITEs on the
// backend, which completes them on its own goroutine (async.go), and
// runs the other commands as syncEngine does.
type engine interface {
	// start runs, starts or queues r (reader goroutine).
	start(r *req)
	// idle is called when the reader is about to wait for its client;
	// qd1 says the client waits for every answer.
	idle(qd1 bool)
	// flush sends the replies held back and publishes what was started.
	flush()
	// lendPayload reads a WRITE's payload into the backend's buffers when
	// r will be started on them; it reports false when r needs a buffer
	// of its own (the payload is then still unread).
	lendPayload(r *req, plen uint64) (bool, error)
	// drain waits for every started request's completion, after the
	// reader and the workers stopped.
	drain()
}

// syncEngine runs requests on a plain Backend.
type syncEngine struct{ c *conn }

func (e syncEngine) start(r *req) { e.c.runOrQueue(r) }

func (e syncEngine) idle(bool) { e.c.kick() }

func (e syncEngine) flush() { e.c.kick() }

func (syncEngine) lendPayload(*req, uint64) (bool, error) { return false, nil }

func (syncEngine) drain() {}

// asyncEngine starts aligned READs and WRITEs on an AsyncBackend.
type asyncEngine struct {
	c  *conn
	be AsyncBackend
}

func (e asyncEngine) start(r *req) {
	if e.c.startable(r.Request) {
		e.c.handleAsync(r)
		return
	}
	e.c.runOrQueue(r)
}

func (e asyncEngine) idle(qd1 bool) {
	if !qd1 {
		e.flush()
		return
	}
	// Queue depth 1: the answer comes before a sleeping reaper could be
	// woken for it, so Poll publishes the request and collects it here.
	// Deeper queues leave it to the reaper: a poller beside it there
	// costs more wake-ups than it saves.
	e.c.kick()
	e.be.Poll(pollSpin)
}

func (e asyncEngine) flush() {
	e.c.kick()
	if err := e.be.Publish(); err != nil {
		e.c.log.Debug("nbd: publishing started requests", "err", err)
	}
}

func (e asyncEngine) lendPayload(r *req, plen uint64) (bool, error) {
	if !e.c.lendable(r.Request) {
		return false, nil
	}
	return e.c.readLent(r, plen)
}

func (e asyncEngine) drain() {
	e.c.unfinished.Wait()
	e.c.kick() // the last batch's replies, if its CompleteBatch lost the race
}
