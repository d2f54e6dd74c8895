package xenstore

import (
	"errors"
	"fmt"
	"slices"
)

// State is the whole of an embedded xenstored's logic: the tree, the
// connections with their watches and transactions, and the introduced
// domains. Handle is its only entry point for requests; it does no I/O
// and is not safe for concurrent use (the Server serialises calls).
type State struct {
	root    *node
	gen     uint64
	conns   map[ConnID]*connState
	nextTx  uint32
	watchN  uint64 // watches registered so far: their seq
	domains map[uint32]bool
	// specialPerms are the permissions of the @ pseudo-nodes.
	specialPerms map[string][]Perm
	// Quota limits what unprivileged domains may use (dom0 is exempt).
	Quota Quota
	// Logf receives notices (CONTROL print, replay failures); may be nil.
	Logf func(format string, args ...any)
}

// Quota holds per-domain limits; the defaults are Xen's.
type Quota struct {
	Nodes        int // nodes owned by one domain
	NodeSize     int // bytes of value (and perms) in one node
	Watches      int // watches per connection
	Transactions int // open transactions per connection
	PathMax      int // bytes of a path below the domain's home
	PermsPerNode int
}

// DefaultQuota is what C xenstored applies to unprivileged domains.
var DefaultQuota = Quota{Nodes: 1000, NodeSize: 2048, Watches: 128, Transactions: 10, PathMax: 2048, PermsPerNode: 5}

// ConnID names a connection of a State.
type ConnID uint64

// Outgoing is a message Handle wants sent on connection Conn.
type Outgoing struct {
	Conn ConnID
	Msg  Message
}

type connState struct {
	domid   uint32
	priv    bool
	watches []*watchReg
	byPath  map[string][]*watchReg // the same watches by path (watchindex.go)
	txs     map[uint32]*txState
}

type watchReg struct {
	path  string // canonical
	orig  string // as the client sent it: event paths are reported in its form
	token string
	seq   uint64 // registration order
}

type txState struct {
	view *view // its snapshot, access record and log of writes
}

// NewState returns a State holding a fresh tree.
func NewState() *State {
	return &State{
		root:    newRoot(),
		conns:   map[ConnID]*connState{},
		domains: map[uint32]bool{0: true},
		specialPerms: map[string][]Perm{
			WatchIntroduceDomain: {{Domid: 0, Access: PermNone}},
			WatchReleaseDomain:   {{Domid: 0, Access: PermNone}},
		},
		Quota: DefaultQuota,
	}
}

func (s *State) nextGen() uint64 { s.gen++; return s.gen }

func (s *State) logf(format string, args ...any) {
	if s.Logf != nil {
		s.Logf(format, args...)
	}
}

// AddConn registers connection id for domain domid. Domain 0 is
// privileged: it bypasses permissions and quotas.
func (s *State) AddConn(id ConnID, domid uint32) {
	s.conns[id] = &connState{domid: domid, priv: domid == 0, txs: map[uint32]*txState{}}
}

// RemoveConn forgets a connection, its watches and transactions.
func (s *State) RemoveConn(id ConnID) { delete(s.conns, id) }

func (s *State) checkValueQuota(v *view, value []byte) error {
	if !v.priv && len(value) > s.Quota.NodeSize {
		return ErrNoSpace
	}
	return nil
}

// checkNodeQuota applies the path length and node count limits to a
// domain creating p.
func (s *State) checkNodeQuota(v *view, p string) error {
	if v.priv {
		return nil
	}
	home := DomainPath(v.domid)
	if isUnder(p, home) && len(p)-len(home) > s.Quota.PathMax {
		return ErrNoSpace
	}
	if lookup(v.root, p) != nil {
		return nil
	}
	missing := 0
	for q := p; lookup(v.root, q) == nil; q = parentOf(q) {
		missing++
	}
	if s.ownedBy(v.root, v.domid)+missing > s.Quota.Nodes {
		return ErrNoSpace
	}
	return nil
}

func (s *State) ownedBy(root *node, domid uint32) int {
	c := 0
	walk(root, "/", func(_ string, n *node) {
		if len(n.perms) > 0 && n.perms[0].Domid == domid {
			c++
		}
	})
	return c
}

// Handle answers one request from connection c: the reply (always first)
// and any watch events, for c and for other connections.
func (s *State) Handle(c ConnID, req Message) []Outgoing {
	cs := s.conns[c]
	if cs == nil {
		return nil
	}
	res, err := s.handle(cs, req)
	if err != nil {
		var xe *Error
		if !errors.As(err, &xe) {
			xe = ErrInvalid
		}
		reply := Message{Type: OpError, ReqID: req.ReqID, TxID: req.TxID, Payload: errorPayload(xe)}
		return []Outgoing{{Conn: c, Msg: reply}}
	}
	out := []Outgoing{{Conn: c, Msg: Message{Type: req.Type, ReqID: req.ReqID, TxID: req.TxID, Payload: res.payload}}}
	if res.event != nil {
		out = append(out, Outgoing{Conn: c, Msg: Message{Type: OpWatchEvent, Payload: res.event}})
	}
	return append(out, s.fire(res.changes)...)
}

// handle finds the request's view of the tree, refuses privileged
// operations to guests, parses the arguments (an operation the State
// does not serve fails there, with ENOSYS), then runs the operation.
// That order is part of the protocol: it decides which error a request
// that is wrong in several ways gets (an unknown transaction beats
// everything, a guest's privileged request beats bad arguments, and only
// well-formed requests look at the tree).
func (s *State) handle(cs *connState, m Message) (response, error) {
	v, err := s.viewFor(cs, m)
	if err != nil {
		return response{}, err
	}
	if privileged(m.Type) && !cs.priv {
		return response{}, ErrAccess
	}
	req, err := parseArgs(m.Type, newArgs(cs.domid, m.Payload))
	if err != nil {
		return response{}, err
	}
	req.tx = m.TxID
	return s.run(m.Type, cs, v, &req)
}

// viewFor returns the tree a request works on: its transaction's snapshot
// or, outside one, the live tree.
func (s *State) viewFor(cs *connState, m Message) (*view, error) {
	if m.TxID == 0 {
		return &view{st: s, root: s.root, domid: cs.domid, priv: cs.priv}, nil
	}
	// Transactions do not nest (C xenstored: EBUSY). Requests that do not
	// touch the tree accept a valid tx_id and ignore it.
	if m.Type == OpTransactionStart {
		return nil, ErrBusy
	}
	tx := cs.txs[m.TxID]
	if tx == nil {
		return nil, ErrNotFound
	}
	return tx.view, nil
}

// fire turns changes into WATCH_EVENTs for every connection's watches,
// in change order, connections by id: the same requests always give the
// same messages in the same order. A watch reports each path once per
// request.
func (s *State) fire(changes []change) []Outgoing {
	if len(changes) == 0 {
		return nil
	}
	ids := make([]ConnID, 0, len(s.conns))
	for id, cs := range s.conns {
		if len(cs.watches) > 0 {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	type key struct {
		w    *watchReg
		path string
	}
	sent := map[key]bool{}
	var out []Outgoing
	for _, ch := range changes {
		for _, id := range ids {
			cs := s.conns[id]
			for _, w := range cs.watchesFor(ch) {
				if sent[key{w, ch.path}] {
					continue
				}
				if !cs.priv {
					perms := ch.perms
					if ch.path[0] == '@' {
						perms = s.specialPerms[ch.path]
					}
					if !accessFor(perms, cs.domid).canRead() {
						continue
					}
				}
				sent[key{w, ch.path}] = true
				ep := ch.path
				if home := DomainPath(cs.domid); w.orig != w.path && isUnder(ch.path, home) && ch.path != home {
					// Relative watch: report the path relative to the home.
					ep = ch.path[len(home)+1:]
				}
				out = append(out, Outgoing{Conn: id, Msg: Message{Type: OpWatchEvent, Payload: joinStrings(ep, w.token)}})
			}
		}
	}
	return out
}

// Check verifies the tree's invariants: sorted unique children, valid
// names, at least one permission per node.
func (s *State) Check() error {
	var err error
	walk(s.root, "/", func(p string, n *node) {
		if err != nil {
			return
		}
		if len(n.perms) == 0 {
			err = fmt.Errorf("%w: %s has no permissions", ErrIO, p)
		}
		var prev *node
		for k := range n.kids.all() {
			if k.name == "" || prev != nil && prev.name >= k.name {
				err = fmt.Errorf("%w: children of %s out of order", ErrIO, p)
			}
			for j := 0; j < len(k.name); j++ {
				if !validPathChar(k.name[j]) || k.name[j] == '/' {
					err = fmt.Errorf("%w: bad child name %q under %s", ErrIO, k.name, p)
				}
			}
			prev = k
		}
		if c := n.kids.count(); c != n.kids.len() {
			err = fmt.Errorf("%w: %s counts %d children but holds %d", ErrIO, p, n.kids.len(), c)
		}
	})
	return err
}
