package xenstore

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
)

// change is one modification that may fire watches. A watch on W fires
// for a non-exact change of p when p is W or lies beneath W; for an exact
// change only when p is W (used for each node a recursive RM deletes).
type change struct {
	path  string
	exact bool
	perms []Perm // of the changed node, for domains' read checks
}

// opRecord is a mutating request inside a transaction, replayed on the
// live tree at commit.
type opRecord struct {
	op    Op
	path  string
	value []byte
	perms []Perm
}

// view applies requests to one root on behalf of one domain. Outside a
// transaction it works on the live tree; inside, on the transaction's
// snapshot, recording every path it touches so the commit can detect
// conflicts.
type view struct {
	st    *State
	root  *node
	domid uint32
	priv  bool
	// Transaction bookkeeping; base is nil outside a transaction.
	base    *node
	seen    map[string]uint64
	log     []opRecord
	changes []change
}

func (v *view) note(p string) {
	if v.base == nil {
		return
	}
	if _, ok := v.seen[p]; !ok {
		v.seen[p] = genOf(v.base, p)
	}
}

func (v *view) canRead(n *node) bool  { return v.priv || accessFor(n.perms, v.domid).canRead() }
func (v *view) canWrite(n *node) bool { return v.priv || accessFor(n.perms, v.domid).canWrite() }

// nearest returns the node at p or its nearest existing ancestor.
func nearest(root *node, p string) *node {
	n := root
	for _, e := range elems(p) {
		c := n.child(e)
		if c == nil {
			return n
		}
		n = c
	}
	return n
}

func (v *view) read(p string) (*node, error) {
	v.note(p)
	n := lookup(v.root, p)
	if n == nil {
		return nil, ErrNotFound
	}
	if !v.canRead(n) {
		return nil, ErrAccess
	}
	return n, nil
}

// inherit gives a new child its parent's permissions; a domain owns what
// it creates.
func (v *view) inherit(parent []Perm) []Perm {
	p := append([]Perm(nil), parent...)
	if !v.priv && len(p) > 0 {
		p[0].Domid = v.domid
	}
	return p
}

// put creates p (and missing parents, with empty values) or updates it,
// applying fn to the node. It records access and a non-exact change of p.
func (v *view) put(p string, fn func(n *node)) error {
	// Permission: write on the node if it exists, else on the nearest
	// ancestor (creating is writing to the parent).
	if t := nearest(v.root, p); !v.canWrite(t) {
		v.note(p)
		return ErrAccess
	}
	if err := v.st.checkNodeQuota(v, p); err != nil {
		return err
	}
	var rec func(n *node, es []string, cur string) *node
	rec = func(n *node, es []string, cur string) *node {
		if len(es) == 0 {
			v.note(cur)
			m := n.clone()
			fn(m)
			m.gen = v.st.nextGen()
			return m
		}
		kp := cur + "/" + es[0]
		if cur == "/" {
			kp = "/" + es[0]
		}
		c := n.child(es[0])
		created := c == nil
		if created {
			v.note(kp)
			c = &node{name: es[0], perms: v.inherit(n.perms), value: []byte{}}
		}
		nc := rec(c, es[1:], kp)
		m := n.withChild(nc)
		if created {
			v.note(cur)
			m.gen = v.st.nextGen()
		}
		return m
	}
	v.root = rec(v.root, elems(p), "/")
	n := lookup(v.root, p)
	v.changes = append(v.changes, change{path: p, perms: n.perms})
	return nil
}

func (v *view) write(p string, value []byte) error {
	if err := v.st.checkValueQuota(v, value); err != nil {
		return err
	}
	if err := v.put(p, func(n *node) { n.value = append([]byte(nil), value...) }); err != nil {
		return err
	}
	v.log = append(v.log, opRecord{op: OpWrite, path: p, value: value})
	return nil
}

func (v *view) mkdir(p string) error {
	v.note(p)
	if n := lookup(v.root, p); n != nil {
		// Existing node: success, nothing changes, no watch fires.
		if !v.canWrite(n) {
			return ErrAccess
		}
		return nil
	}
	if err := v.put(p, func(*node) {}); err != nil {
		return err
	}
	v.log = append(v.log, opRecord{op: OpMkdir, path: p})
	return nil
}

func (v *view) setPerms(p string, perms []Perm) error {
	v.note(p)
	n := lookup(v.root, p)
	if n == nil {
		return ErrNotFound
	}
	if !v.priv && !(len(n.perms) > 0 && n.perms[0].Domid == v.domid) {
		// Only the owner (or dom0) may change permissions.
		return ErrAccess
	}
	if !v.priv && perms[0].Domid != n.perms[0].Domid {
		// Giving a node away would give away quota: only dom0 may.
		return ErrPermission
	}
	if !v.priv && len(perms) > v.st.Quota.PermsPerNode {
		return ErrNoSpace
	}
	np := append([]Perm(nil), perms...)
	if err := v.put(p, func(n *node) { n.perms = np }); err != nil {
		return err
	}
	v.log = append(v.log, opRecord{op: OpSetPerms, path: p, perms: np})
	return nil
}

// rm deletes p and everything beneath it. A missing node whose parent
// exists is success (as C xenstored answers); a missing parent is ENOENT.
func (v *view) rm(p string) error {
	v.note(p)
	if p == "/" {
		return ErrInvalid
	}
	n := lookup(v.root, p)
	parent := parentOf(p)
	if n == nil {
		v.note(parent)
		if lookup(v.root, parent) == nil {
			return ErrNotFound
		}
		return nil
	}
	if !v.canWrite(n) {
		return ErrAccess
	}
	v.note(parent)
	var deleted []change
	walk(n, p, func(q string, d *node) {
		deleted = append(deleted, change{path: q, exact: true, perms: d.perms})
	})
	gen := v.st.nextGen()
	var rec func(m *node, es []string) *node
	rec = func(m *node, es []string) *node {
		if len(es) == 1 {
			r := m.withoutChild(es[0])
			r.gen = gen
			return r
		}
		return m.withChild(rec(m.child(es[0]), es[1:]))
	}
	v.root = rec(v.root, elems(p))
	v.changes = append(v.changes, change{path: p, perms: n.perms})
	v.changes = append(v.changes, deleted...)
	v.log = append(v.log, opRecord{op: OpRm, path: p})
	return nil
}

// State is the whole of an embedded xenstored's logic: the tree, the
// connections with their watches and transactions, and the introduced
// domains. Handle is its only entry point for requests; it does no I/O
// and is not safe for concurrent use (the Server serialises calls).
type State struct {
	root    *node
	gen     uint64
	conns   map[ConnID]*connState
	nextTx  uint32
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
	txs     map[uint32]*txState
}

type watchReg struct {
	path  string // canonical
	orig  string // as the client sent it: event paths are reported in its form
	token string
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
	out, changes, err := s.handle(c, cs, req)
	var reply Message
	if err != nil {
		var xe *Error
		if !errors.As(err, &xe) {
			xe = ErrInvalid
		}
		reply = Message{Type: OpError, ReqID: req.ReqID, TxID: req.TxID, Payload: errorPayload(xe)}
	} else {
		reply = Message{Type: req.Type, ReqID: req.ReqID, TxID: req.TxID, Payload: out}
	}
	res := []Outgoing{{Conn: c, Msg: reply}}
	if err == nil && req.Type == OpWatch {
		// The first event goes right after the OK, with the path as given.
		parts, _ := splitStrings(req.Payload)
		res = append(res, Outgoing{Conn: c, Msg: Message{Type: OpWatchEvent, Payload: joinStrings(parts[0], parts[1])}})
	}
	return append(res, s.fire(changes)...)
}

var okPayload = []byte("OK\x00")

func (s *State) handle(c ConnID, cs *connState, req Message) ([]byte, []change, error) {
	// Requests inside a transaction run on its view.
	var v *view
	if req.TxID != 0 {
		// Transactions do not nest (C xenstored: EBUSY). Requests that do
		// not touch the tree accept a valid tx_id and ignore it.
		if req.Type == OpTransactionStart {
			return nil, nil, ErrBusy
		}
		tx := cs.txs[req.TxID]
		if tx == nil {
			return nil, nil, ErrNotFound
		}
		v = tx.view
	} else {
		v = &view{st: s, root: s.root, domid: cs.domid, priv: cs.priv}
	}
	commit := func(out []byte, err error) ([]byte, []change, error) {
		if err != nil || v.base != nil {
			return out, nil, err
		}
		s.root = v.root
		return out, v.changes, nil
	}
	args, ok := splitStrings(req.Payload)
	arg := func(n int) bool { return ok && len(args) == n }
	// path is the request's first argument as a path, once the request
	// has exactly n arguments (any number but none when n is 0).
	path := func(n int) (string, error) {
		if !ok || len(args) < 1 || (n > 0 && len(args) != n) {
			return "", ErrInvalid
		}
		return CanonicalPath(cs.domid, args[0], false)
	}

	switch req.Type {
	case OpRead:
		p, err := path(1)
		if err != nil {
			return nil, nil, err
		}
		n, err := v.read(p)
		if err != nil {
			return nil, nil, err
		}
		return append([]byte(nil), n.value...), nil, nil

	case OpWrite:
		i := indexNUL(req.Payload)
		if i < 0 {
			return nil, nil, ErrInvalid
		}
		p, err := CanonicalPath(cs.domid, string(req.Payload[:i]), false)
		if err != nil {
			return nil, nil, err
		}
		return commit(okPayload, v.write(p, req.Payload[i+1:]))

	case OpMkdir:
		p, err := path(1)
		if err != nil {
			return nil, nil, err
		}
		return commit(okPayload, v.mkdir(p))

	case OpRm:
		p, err := path(1)
		if err != nil {
			return nil, nil, err
		}
		return commit(okPayload, v.rm(p))

	case OpDirectory:
		p, err := path(1)
		if err != nil {
			return nil, nil, err
		}
		n, err := v.read(p)
		if err != nil {
			return nil, nil, err
		}
		names := make([]string, len(n.kids))
		for i, k := range n.kids {
			names[i] = k.name
		}
		b := joinStrings(names...)
		if len(b) > PayloadMax {
			return nil, nil, ErrTooBig
		}
		return b, nil, nil

	case OpDirectoryPart:
		p, err := path(2)
		if err != nil {
			return nil, nil, err
		}
		off, err := strconv.ParseUint(args[1], 10, 31)
		if err != nil {
			return nil, nil, ErrInvalid
		}
		n, err := v.read(p)
		if err != nil {
			return nil, nil, err
		}
		return directoryPart(n, int(off)), nil, nil

	case OpGetPerms:
		if !arg(1) {
			return nil, nil, ErrInvalid
		}
		if len(args[0]) > 0 && args[0][0] == '@' {
			perms, ok := s.specialPerms[args[0]]
			if !ok {
				return nil, nil, ErrNotFound
			}
			return permsPayload(perms), nil, nil
		}
		p, err := path(0)
		if err != nil {
			return nil, nil, err
		}
		n, err := v.read(p)
		if err != nil {
			return nil, nil, err
		}
		return permsPayload(n.perms), nil, nil

	case OpSetPerms:
		if !ok || len(args) < 2 {
			return nil, nil, ErrInvalid
		}
		perms := make([]Perm, 0, len(args)-1)
		for _, a := range args[1:] {
			pm, err := ParsePerm(a)
			if err != nil {
				return nil, nil, ErrInvalid
			}
			perms = append(perms, pm)
		}
		if args[0] != "" && args[0][0] == '@' {
			if !cs.priv {
				return nil, nil, ErrAccess
			}
			if _, ok := s.specialPerms[args[0]]; !ok {
				return nil, nil, ErrNotFound
			}
			s.specialPerms[args[0]] = perms
			return okPayload, nil, nil
		}
		p, err := path(0)
		if err != nil {
			return nil, nil, err
		}
		return commit(okPayload, v.setPerms(p, perms))

	case OpWatch:
		if !ok || len(args) != 2 {
			return nil, nil, ErrInvalid
		}
		p, err := CanonicalPath(cs.domid, args[0], true)
		if err != nil {
			return nil, nil, err
		}
		for _, w := range cs.watches {
			if w.path == p && w.token == args[1] {
				return nil, nil, ErrExists
			}
		}
		if !cs.priv && len(cs.watches) >= s.Quota.Watches {
			return nil, nil, ErrNoSpace
		}
		cs.watches = append(cs.watches, &watchReg{path: p, orig: args[0], token: args[1]})
		return okPayload, nil, nil

	case OpUnwatch:
		if !ok || len(args) != 2 {
			return nil, nil, ErrInvalid
		}
		p, err := CanonicalPath(cs.domid, args[0], true)
		if err != nil {
			return nil, nil, err
		}
		for i, w := range cs.watches {
			if w.path == p && w.token == args[1] {
				cs.watches = append(cs.watches[:i:i], cs.watches[i+1:]...)
				return okPayload, nil, nil
			}
		}
		return nil, nil, ErrNotFound

	case OpTransactionStart:
		if !cs.priv && len(cs.txs) >= s.Quota.Transactions {
			return nil, nil, ErrNoSpace
		}
		s.nextTx++
		if s.nextTx == 0 {
			s.nextTx = 1
		}
		id := s.nextTx
		cs.txs[id] = &txState{view: &view{
			st: s, root: s.root, base: s.root, domid: cs.domid, priv: cs.priv, seen: map[string]uint64{},
		}}
		return joinStrings(strconv.FormatUint(uint64(id), 10)), nil, nil

	case OpTransactionEnd:
		if !arg(1) || (args[0] != "T" && args[0] != "F") {
			return nil, nil, ErrInvalid
		}
		tx := cs.txs[req.TxID]
		if tx == nil {
			return nil, nil, ErrNotFound
		}
		delete(cs.txs, req.TxID)
		if args[0] == "F" {
			return okPayload, nil, nil
		}
		changes, err := s.commitTx(tx.view)
		return okPayload, changes, err

	case OpGetDomainPath:
		if !arg(1) {
			return nil, nil, ErrInvalid
		}
		// Both Xen daemons read the number like atoi: "x" is domain 0.
		return joinStrings(DomainPath(atoi(args[0]))), nil, nil

	case OpIsDomainIntroduced:
		if !arg(1) {
			return nil, nil, ErrInvalid
		}
		id, err := strconv.ParseUint(args[0], 10, 32)
		if err != nil {
			return nil, nil, ErrInvalid
		}
		if s.domains[uint32(id)] {
			return joinStrings("T"), nil, nil
		}
		return joinStrings("F"), nil, nil

	case OpIntroduce:
		if !cs.priv {
			return nil, nil, ErrAccess
		}
		if !arg(3) {
			return nil, nil, ErrInvalid
		}
		id, err := strconv.ParseUint(args[0], 10, 32)
		if err != nil || id == 0 {
			return nil, nil, ErrInvalid
		}
		if _, err := strconv.ParseUint(args[1], 10, 64); err != nil {
			return nil, nil, ErrInvalid
		}
		if _, err := strconv.ParseUint(args[2], 10, 32); err != nil {
			return nil, nil, ErrInvalid
		}
		if s.domains[uint32(id)] {
			return okPayload, nil, nil
		}
		s.domains[uint32(id)] = true
		return okPayload, []change{{path: WatchIntroduceDomain, exact: true}}, nil

	case OpRelease:
		if !cs.priv {
			return nil, nil, ErrAccess
		}
		if !arg(1) {
			return nil, nil, ErrInvalid
		}
		id, err := strconv.ParseUint(args[0], 10, 32)
		if err != nil || id == 0 {
			return nil, nil, ErrInvalid
		}
		if !s.domains[uint32(id)] {
			return nil, nil, ErrNotFound
		}
		delete(s.domains, uint32(id))
		return okPayload, []change{{path: WatchReleaseDomain, exact: true}}, nil

	case OpResume, OpSetTarget:
		if !cs.priv {
			return nil, nil, ErrAccess
		}
		if !ok || len(args) != map[Op]int{OpResume: 1, OpSetTarget: 2}[req.Type] {
			return nil, nil, ErrInvalid
		}
		for _, a := range args {
			id, err := strconv.ParseUint(a, 10, 32)
			if err != nil {
				return nil, nil, ErrInvalid
			}
			if !s.domains[uint32(id)] {
				return nil, nil, ErrNotFound
			}
		}
		return okPayload, nil, nil

	case OpResetWatches:
		cs.watches = nil
		cs.txs = map[uint32]*txState{}
		return okPayload, nil, nil

	case OpControl:
		if !cs.priv {
			return nil, nil, ErrAccess
		}
		if !ok || len(args) < 1 {
			return nil, nil, ErrInvalid
		}
		switch args[0] {
		case "print":
			if len(args) < 2 {
				return nil, nil, ErrInvalid
			}
			s.logf("control print: %s", args[1])
			return okPayload, nil, nil
		case "check":
			if err := s.Check(); err != nil {
				s.logf("control check: %v", err)
				return nil, nil, ErrIO
			}
			return okPayload, nil, nil
		case "help":
			return joinStrings("check\nprint <string>\nhelp\n"), nil, nil
		}
		return nil, nil, ErrInvalid
	}
	return nil, nil, ErrNotSupp
}

// atoi reads leading decimal digits; none gives 0.
func atoi(s string) uint32 {
	var n uint32
	for i := 0; i < len(s) && s[i] >= '0' && s[i] <= '9'; i++ {
		n = n*10 + uint32(s[i]-'0')
	}
	return n
}

func indexNUL(b []byte) int {
	for i, c := range b {
		if c == 0 {
			return i
		}
	}
	return -1
}

// directoryPart answers DIRECTORY_PART: the node's generation, then as
// many whole names (from byte offset off of the full list) as fit; the
// last chunk ends with an extra NUL.
func directoryPart(n *node, off int) []byte {
	names := make([]string, len(n.kids))
	for i, k := range n.kids {
		names[i] = k.name
	}
	all := joinStrings(names...)
	head := joinStrings(strconv.FormatUint(n.gen, 10))
	if off >= len(all) {
		return append(head, 0)
	}
	rest := all[off:]
	room := PayloadMax - len(head) - 1
	if len(rest) <= room {
		return append(append(head, rest...), 0)
	}
	// Cut after the last whole name that fits.
	cut := 0
	for i := 0; i < room; i++ {
		if rest[i] == 0 {
			cut = i + 1
		}
	}
	return append(head, rest[:cut]...)
}

// commitTx applies a transaction if nothing it touched changed since it
// started, else EAGAIN.
func (s *State) commitTx(v *view) ([]change, error) {
	for p, g := range v.seen {
		if genOf(s.root, p) != g {
			return nil, ErrAgain
		}
	}
	live := &view{st: s, root: s.root, domid: v.domid, priv: v.priv}
	for _, r := range v.log {
		var err error
		switch r.op {
		case OpWrite:
			err = live.write(r.path, r.value)
		case OpMkdir:
			err = live.mkdir(r.path)
		case OpRm:
			err = live.rm(r.path)
		case OpSetPerms:
			err = live.setPerms(r.path, r.perms)
		}
		if err != nil {
			// Nothing the transaction touched changed, but a limit that
			// depends on the whole tree (a domain's node quota) may now
			// be exceeded: fail the commit as a whole, touching nothing.
			s.logf("transaction replay of %s %s: %v", r.op, r.path, err)
			return nil, err
		}
	}
	s.root = live.root
	return live.changes, nil
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
			for _, w := range cs.watches {
				var hit bool
				if ch.exact {
					hit = ch.path == w.path
				} else {
					hit = isUnder(ch.path, w.path)
				}
				if !hit || sent[key{w, ch.path}] {
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
		for i, k := range n.kids {
			if k.name == "" || i > 0 && n.kids[i-1].name >= k.name {
				err = fmt.Errorf("%w: children of %s out of order", ErrIO, p)
			}
			for j := 0; j < len(k.name); j++ {
				if !validPathChar(k.name[j]) || k.name[j] == '/' {
					err = fmt.Errorf("%w: bad child name %q under %s", ErrIO, k.name, p)
				}
			}
		}
	})
	return err
}
