package xenstore

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// Event is one watch firing. Overflow means events were dropped (or the
// connection was re-established): the consumer must re-read everything
// the watch covers.
type Event struct {
	Path, Token string
	Overflow    bool
}

// Watch delivers the events of one registered watch. Events arrive on a
// bounded queue that never blocks the client's reader.
type Watch struct {
	c     *Client
	path  string
	token string
	out   chan Event

	mu      sync.Mutex
	queue   []Event
	wake    chan struct{}
	stopped chan struct{}
	once    sync.Once
}

// Watch registers a watch on path (and everything beneath it). The server
// fires it once right away; xenstored may also fire spuriously, so treat
// each event as "something may have changed".
func (c *Client) Watch(ctx context.Context, path, token string) (*Watch, error) {
	w := &Watch{c: c, path: path, token: token, out: make(chan Event),
		wake: make(chan struct{}, 1), stopped: make(chan struct{})}
	// Register locally first so the initial event, which may arrive
	// before the reply is processed, is not lost.
	c.mu.Lock()
	if c.mu.closed {
		c.mu.Unlock()
		return nil, ErrClosed
	}
	c.mu.watches.add(w)
	c.mu.Unlock()
	if _, err := c.request(ctx, OpWatch, 0, joinStrings(path, token)); err != nil {
		c.mu.Lock()
		c.mu.watches.remove(w)
		c.mu.Unlock()
		return nil, fmt.Errorf("watch %s: %w", path, err)
	}
	c.wg.Add(1)
	go w.pump()
	return w, nil
}

// Events returns the channel of events; it is closed by Close (of the
// watch or of the client).
func (w *Watch) Events() <-chan Event { return w.out }

// push queues ev. When the queue is full its contents are replaced by a
// single Overflow event: the consumer will re-read anyway.
func (w *Watch) push(ev Event, overflow bool) {
	w.mu.Lock()
	if overflow || len(w.queue) >= WatchQueueLen {
		w.queue = append(w.queue[:0], Event{Path: w.path, Token: w.token, Overflow: true})
	} else {
		w.queue = append(w.queue, ev)
	}
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

func (w *Watch) pump() {
	defer w.c.wg.Done()
	defer close(w.out)
	for {
		w.mu.Lock()
		if len(w.queue) == 0 {
			w.mu.Unlock()
			select {
			case <-w.wake:
				continue
			case <-w.stopped:
				return
			}
		}
		ev := w.queue[0]
		w.queue = w.queue[1:]
		w.mu.Unlock()
		select {
		case w.out <- ev:
		case <-w.stopped:
			return
		}
	}
}

func (w *Watch) stop() { w.once.Do(func() { close(w.stopped) }) }

// Close unregisters the watch (UNWATCH) and closes its channel.
func (w *Watch) Close() error {
	c := w.c
	c.mu.Lock()
	live := c.mu.watches.remove(w)
	c.mu.Unlock()
	w.stop()
	if !live {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := c.request(ctx, OpUnwatch, 0, joinStrings(w.path, w.token)); err != nil {
		if errors.Is(err, ErrClosed) {
			return nil
		}
		return fmt.Errorf("unwatch %s: %w", w.path, err)
	}
	return nil
}

// watchSet is a client's watches by token. An event names its token, and
// a daemon with a watch per disk looked at every watch for every event:
// quadratic in the disks over a fleet's convergence.
type watchSet map[string]map[*Watch]struct{}

func (s watchSet) add(w *Watch) {
	m := s[w.token]
	if m == nil {
		m = map[*Watch]struct{}{}
		s[w.token] = m
	}
	m[w] = struct{}{}
}

// remove reports whether w was there.
func (s watchSet) remove(w *Watch) bool {
	m := s[w.token]
	_, ok := m[w]
	delete(m, w)
	if len(m) == 0 {
		delete(s, w.token)
	}
	return ok
}

func (s watchSet) all() []*Watch {
	var ws []*Watch
	for _, m := range s {
		for w := range m {
			ws = append(ws, w)
		}
	}
	return ws
}
